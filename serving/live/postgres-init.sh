#!/bin/sh
# PostgreSQL first-start script of the compose stack (mounted into
# /docker-entrypoint-initdb.d/): the live-accuracy store gets its own role and database, so
# that the model servers, which write it, hold no credentials of the MLflow backend store.
#   role kronos_live (LOGIN, password: the compose secret live_db_password)
#   database kronos_live, owned by it
# and PUBLIC loses CONNECT on the MLflow database (its owner keeps it).
# The entrypoint runs this once, on an empty data volume; for an existing one run it by hand:
#   docker compose exec postgres sh /docker-entrypoint-initdb.d/20-kronos-live.sh
set -eu
password_file="${KRONOS_LIVE_DB_PASSWORD_FILE:-/run/secrets/live_db_password}"
role="${KRONOS_LIVE_DB_USER:-kronos_live}"
database="${KRONOS_LIVE_DB_NAME:-kronos_live}"
password="$(cat "$password_file")"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v role="$role" -v password="$password" -v live_db="$database" -v mlflow_db="$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'password')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'live_db', :'role')
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'live_db') \gexec
SELECT format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', :'mlflow_db') \gexec
SQL
