#!/bin/sh
# Create fedround's buckets, MinIO users and policies; safe to run again. Runs in the
# minio/mc image (compose service s3-init, k8s Job minio-init). Secrets are files in
# $SECRETS: minio_root_user, minio_root_password, coordinator_s3_access_key,
# coordinator_s3_secret_key (the coordinator of tenant $TENANT), mlflow_s3_access_key,
# mlflow_s3_secret_key (the MLflow server) and, per site S, site_S_s3_access_key /
# site_S_s3_secret_key. The tenant's coordinator may read, write and list
# <bucket>/<federation>/* and <bucket>/_tenants/<tenant>/* only (policies/coordinator.json,
# MinIO policy and user fedround-coordinator-<tenant>); the MLflow server
# <mlflow bucket>/artifacts/* only (policies/mlflow.json); sites may read and list
# <bucket>/<federation>/global/* and write <bucket>/<federation>/updates/<site>/* only
# (policies/site.json). For a second tenant, run it again with that tenant's TENANT,
# FEDERATION, SITES and coordinator and site secrets (the same MLflow pair): that tenant's
# coordinator gets its own user and policy, and other tenants' users are left as they are.
# MinIO is reached over TLS (MINIO_URL https://...): mc trusts the CA certificates in
# <mc config dir>/certs/CAs/, where the manifests mount the deployment's ca.crt.
set -eu
SECRETS="${SECRETS:-/run/secrets}"
POLICIES="${POLICIES:-/policies}"
BUCKET="${BUCKET:-fedround}"
MLFLOW_BUCKET="${MLFLOW_BUCKET:-mlflow}"
TENANT="${TENANT:?set TENANT}"
FEDERATION="${FEDERATION:?set FEDERATION}"
SITES="${SITES:-}"
MINIO_URL="${MINIO_URL:-https://minio:9000}"

secret() { cat "$SECRETS/$1"; }
# Refuse empty and placeholder secrets (REPLACE_ME of deployments/k8s/secrets.yaml, MinIO's
# minioadmin, changeme, ...); their values are never printed. FEDROUND_INSECURE_DEV=1 goes
# on with a warning: throw-away setups only. Real ones: deployments/make-secrets.sh.
vet() {  # secret-file
  case "$(secret "$1" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')" in
    "" | replace_me | replaceme | replace-me | changeme | change_me | change-me | changeit | \
      password | secret | minioadmin | *replace_me* | *changeme* | '<'*'>' | '${'* | '$('*)
      case "${FEDROUND_INSECURE_DEV:-}" in
        1 | true | yes | on) echo "minio-init: WARNING: secret $1 is empty or a placeholder;" \
          "going on because FEDROUND_INSECURE_DEV is set (throw-away setups only)" >&2 ;;
        *) echo "minio-init: secret $1 is empty or a placeholder (REPLACE_ME, changeme," \
          "minioadmin, ...): provision real secrets (deployments/make-secrets.sh for compose," \
          "your secret manager for Kubernetes; see deployments/README.md)" >&2
          exit 1 ;;
      esac ;;
  esac
}
# Tenant, federation and site names go into the policies' resources and conditions: only
# names as fedround's config allows them (lowercase letters, digits, '-'; at most 63), so
# none can widen a grant (a '*', a '/', ...).
check_name() {  # what value
  case "$2" in
    "" | *[!a-z0-9-]* | -* | *-) ;;
    *) [ "${#2}" -gt 63 ] || return 0 ;;
  esac
  echo "minio-init: $1 '$2' is not a name (lowercase letters, digits and '-', at most 63" \
    "characters)" >&2
  exit 1
}
render() {  # policy-file site output
  sed -e "s|@BUCKET@|$BUCKET|g" -e "s|@MLFLOW_BUCKET@|$MLFLOW_BUCKET|g" \
      -e "s|@TENANT@|$TENANT|g" -e "s|@FEDERATION@|$FEDERATION|g" -e "s|@SITE@|$2|g" \
      "$POLICIES/$1" > "$3"
}
user() {  # policy-name access-key secret-key policy-file
  mc admin policy create fedround "$1" "$4"
  mc admin user add fedround "$2" "$3"
  mc admin policy attach fedround "$1" --user "$2" 2>/dev/null || true  # already attached
}

check_name TENANT "$TENANT"
check_name FEDERATION "$FEDERATION"
for site in $SITES; do
  check_name site "$site"
done
for name in minio_root_user minio_root_password coordinator_s3_access_key \
  coordinator_s3_secret_key mlflow_s3_access_key mlflow_s3_secret_key; do
  vet "$name"
done
for site in $SITES; do
  vet "site_${site}_s3_access_key"
  vet "site_${site}_s3_secret_key"
done

tries=0
until mc alias set fedround "$MINIO_URL" "$(secret minio_root_user)" "$(secret minio_root_password)" >/dev/null; do
  tries=$((tries + 1))
  [ "$tries" -lt 60 ] || { echo "minio-init: $MINIO_URL did not answer" >&2; exit 1; }
  sleep 2
done
mc mb --ignore-existing "fedround/$BUCKET" "fedround/$MLFLOW_BUCKET"
mc version enable "fedround/$BUCKET"
# Old versions of what sites write under <federation>/updates/ (a session's heartbeat,
# rewritten every second, keeps ~86,400 a day per site) expire a day after they were
# replaced; current objects, checkpoints and the audit log are untouched. The coordinator
# also deletes old heartbeat versions itself (flows/distributed.py): this is the backstop.
mc ilm rule ls "fedround/$BUCKET" 2>/dev/null | grep -q "$FEDERATION/updates/" ||
  mc ilm rule add --prefix "$FEDERATION/updates/" --noncurrent-expire-days 1 "fedround/$BUCKET"

work="$(mktemp -d)"
render coordinator.json "" "$work/coordinator.json"
user "fedround-coordinator-$TENANT" "$(secret coordinator_s3_access_key)" \
     "$(secret coordinator_s3_secret_key)" "$work/coordinator.json"
# Deployments from before per-tenant policies attached the bucket-wide policy
# fedround-coordinator to this user: take it off, so only the tenant's policy is left (and
# drop it once no user holds it any more).
mc admin policy detach fedround fedround-coordinator --user "$(secret coordinator_s3_access_key)" \
  >/dev/null 2>&1 || true
mc admin policy rm fedround fedround-coordinator >/dev/null 2>&1 || true
render mlflow.json "" "$work/mlflow.json"
user fedround-mlflow "$(secret mlflow_s3_access_key)" "$(secret mlflow_s3_secret_key)" "$work/mlflow.json"
for site in $SITES; do
  render site.json "$site" "$work/site-$site.json"
  user "fedround-site-$FEDERATION-$site" "$(secret "site_${site}_s3_access_key")" \
       "$(secret "site_${site}_s3_secret_key")" "$work/site-$site.json"
done
rm -rf "$work"
echo "minio-init: buckets $BUCKET (versioned, old versions under $FEDERATION/updates/ expire after a day) and $MLFLOW_BUCKET, users of tenant $TENANT's coordinator, MLflow and ${SITES:-no} sites ready"
