-- The postgres image creates the Optuna database (POSTGRES_DB); MLflow gets its own.
CREATE DATABASE mlflow;
