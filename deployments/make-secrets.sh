#!/usr/bin/env bash
# Write random secrets for deployments/compose.yaml into deployments/secrets/ (mode 0600),
# leaving existing files alone. Sites: the arguments (default: site-01). An existing file
# that holds a placeholder (REPLACE_ME, changeme, minioadmin, ...) stops it: the services
# refuse those at start; delete the file and run it again. See deployments/README.md.
set -euo pipefail
cd "$(dirname "$0")/secrets"
umask 077
random() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c "$1"; }
put() {
  if [ ! -s "$1" ]; then
    printf '%s' "$2" > "$1"
    return
  fi
  case "$(tr -d '[:space:]' < "$1" | tr '[:upper:]' '[:lower:]')" in
    "" | replace_me | replaceme | replace-me | changeme | change_me | change-me | changeit | \
      password | secret | minioadmin | *replace_me* | *changeme*)
      echo "make-secrets: $PWD/$1 holds a placeholder or nothing: delete it and run again" >&2
      exit 1 ;;
  esac
}
put postgres_password "$(random 32)"
put mlflow_backend_store_uri "postgresql://fedround:$(cat postgres_password)@postgres:5432/mlflow"
put minio_root_user "fedround-root"
put minio_root_password "$(random 40)"
put coordinator_s3_access_key "coordinator-$(random 8)"
put coordinator_s3_secret_key "$(random 40)"
# The MLflow server's own S3 identity (its artifact proxy: s3://mlflow/artifacts/* only).
put mlflow_s3_access_key "mlflow-$(random 8)"
put mlflow_s3_secret_key "$(random 40)"
# The control plane's credentials (deployments/README.md, "Authentication and TLS"): the
# Prefect server's API auth string (user:password), the MLflow admin's password, the MLflow
# server's Flask secret key and the coordinator's MLflow password. MLflow refuses passwords
# shorter than 12 characters; these have about 40.
put prefect_auth_string "fedround:$(random 40)"
put mlflow_admin_password "$(random 40)"
put mlflow_flask_secret_key "$(random 40)"
put mlflow_coordinator_password "$(random 40)"
for site in "${@:-site-01}"; do
  put "site_${site}_s3_access_key" "${site}-$(random 8)"
  put "site_${site}_s3_secret_key" "$(random 40)"
done
echo "secrets in $PWD"
