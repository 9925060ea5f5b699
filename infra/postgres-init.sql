-- Prefect uses the database POSTGRES_DB creates (prefect); MLflow gets its own.
CREATE DATABASE mlflow OWNER gptmini;
