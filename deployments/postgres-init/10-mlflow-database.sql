-- Runs once, when the Postgres volume is first initialised: Prefect uses the database named
-- by POSTGRES_DB (prefect); MLflow's tracking store gets its own.
CREATE DATABASE mlflow;
