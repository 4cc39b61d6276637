#!/bin/sh
# Create fedround's buckets, MinIO users and policies; safe to run again. Runs in the
# minio/mc image (compose service s3-init, k8s Job minio-init). Secrets are files in
# $SECRETS: minio_root_user, minio_root_password, coordinator_s3_access_key,
# coordinator_s3_secret_key and, per site S, site_S_s3_access_key / site_S_s3_secret_key.
# Sites may read and list <bucket>/<federation>/global/* and write
# <bucket>/<federation>/updates/<site>/* only (policies/site.json).
set -eu
SECRETS="${SECRETS:-/run/secrets}"
POLICIES="${POLICIES:-/policies}"
BUCKET="${BUCKET:-fedround}"
MLFLOW_BUCKET="${MLFLOW_BUCKET:-mlflow}"
FEDERATION="${FEDERATION:?set FEDERATION}"
SITES="${SITES:-}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"

secret() { cat "$SECRETS/$1"; }
render() {  # policy-file site output
  sed -e "s|@BUCKET@|$BUCKET|g" -e "s|@MLFLOW_BUCKET@|$MLFLOW_BUCKET|g" \
      -e "s|@FEDERATION@|$FEDERATION|g" -e "s|@SITE@|$2|g" "$POLICIES/$1" > "$3"
}
user() {  # policy-name access-key secret-key policy-file
  mc admin policy create fedround "$1" "$4"
  mc admin user add fedround "$2" "$3"
  mc admin policy attach fedround "$1" --user "$2" 2>/dev/null || true  # already attached
}

tries=0
until mc alias set fedround "$MINIO_URL" "$(secret minio_root_user)" "$(secret minio_root_password)" >/dev/null; do
  tries=$((tries + 1))
  [ "$tries" -lt 60 ] || { echo "minio-init: $MINIO_URL did not answer" >&2; exit 1; }
  sleep 2
done
mc mb --ignore-existing "fedround/$BUCKET" "fedround/$MLFLOW_BUCKET"
mc version enable "fedround/$BUCKET"

work="$(mktemp -d)"
render coordinator.json "" "$work/coordinator.json"
user fedround-coordinator "$(secret coordinator_s3_access_key)" "$(secret coordinator_s3_secret_key)" "$work/coordinator.json"
for site in $SITES; do
  render site.json "$site" "$work/site-$site.json"
  user "fedround-site-$FEDERATION-$site" "$(secret "site_${site}_s3_access_key")" \
       "$(secret "site_${site}_s3_secret_key")" "$work/site-$site.json"
done
rm -rf "$work"
echo "minio-init: buckets $BUCKET (versioned) and $MLFLOW_BUCKET, coordinator and ${SITES:-no} site users ready"
