#!/bin/sh
# The role the agent connects as: it owns nothing, so it cannot disable the audit triggers or
# rewrite history; `migrate --app-role` grants it what the agent needs.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v app_password="${FROSTBYTE_APP_PASSWORD}" <<'SQL'
CREATE ROLE frostbyte_app LOGIN PASSWORD :'app_password';
SQL
