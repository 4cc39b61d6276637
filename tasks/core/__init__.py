"""The federated-learning core: strategies, update validation, serialization, manifests.

Pure code. It imports no Prefect, MLflow, Great Expectations, DVC or S3 client (an
import-linter contract in pyproject.toml enforces it), so it is unit-tested in
milliseconds and reused unchanged at the coordinator and at the sites.
"""
