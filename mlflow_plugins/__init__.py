"""MLflow plugins registered through entry points in pyproject.toml."""
