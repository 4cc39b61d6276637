#!/bin/sh
# Create fedround's buckets, MinIO users and policies; safe to run again. Runs in the
# minio/mc image (compose service s3-init, k8s Job minio-init). Secrets are files in
# $SECRETS: minio_root_user, minio_root_password, coordinator_s3_access_key,
# coordinator_s3_secret_key and, per site S, site_S_s3_access_key / site_S_s3_secret_key.
# Sites may read and list <bucket>/<federation>/global/* and write
# <bucket>/<federation>/updates/<site>/* only (policies/site.json). MinIO is reached over
# TLS (MINIO_URL https://...): mc trusts the CA certificates in <mc config dir>/certs/CAs/,
# where the manifests mount the deployment's ca.crt.
set -eu
SECRETS="${SECRETS:-/run/secrets}"
POLICIES="${POLICIES:-/policies}"
BUCKET="${BUCKET:-fedround}"
MLFLOW_BUCKET="${MLFLOW_BUCKET:-mlflow}"
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
render() {  # policy-file site output
  sed -e "s|@BUCKET@|$BUCKET|g" -e "s|@MLFLOW_BUCKET@|$MLFLOW_BUCKET|g" \
      -e "s|@FEDERATION@|$FEDERATION|g" -e "s|@SITE@|$2|g" "$POLICIES/$1" > "$3"
}
user() {  # policy-name access-key secret-key policy-file
  mc admin policy create fedround "$1" "$4"
  mc admin user add fedround "$2" "$3"
  mc admin policy attach fedround "$1" --user "$2" 2>/dev/null || true  # already attached
}

for name in minio_root_user minio_root_password coordinator_s3_access_key coordinator_s3_secret_key; do
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
user fedround-coordinator "$(secret coordinator_s3_access_key)" "$(secret coordinator_s3_secret_key)" "$work/coordinator.json"
for site in $SITES; do
  render site.json "$site" "$work/site-$site.json"
  user "fedround-site-$FEDERATION-$site" "$(secret "site_${site}_s3_access_key")" \
       "$(secret "site_${site}_s3_secret_key")" "$work/site-$site.json"
done
rm -rf "$work"
echo "minio-init: buckets $BUCKET (versioned, old versions under $FEDERATION/updates/ expire after a day) and $MLFLOW_BUCKET, coordinator and ${SITES:-no} site users ready"
