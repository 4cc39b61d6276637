"""Local service stack for pilots and tests: S3, MLflow, Prefect (and its Postgres) as
processes on 127.0.0.1, supervised by ``fedround up`` / ``down`` / ``status``.

- :mod:`.stack`    the supervisor: ``ServiceStack``, ``Endpoints``, ``up`` / ``down`` / ``status``
- :mod:`.proc`     process plumbing: ports, run records, spawn, health, stop
- :mod:`.s3`       the S3 server (``weed mini``) and its per-site access keys
- :mod:`.postgres` the private Postgres cluster behind the Prefect server
"""
