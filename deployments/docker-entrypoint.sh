#!/bin/sh
# For each NAME_FILE=/path in the environment, export NAME with that file's content, so
# secrets arrive as files (docker secrets, mounted k8s Secrets) and never in the compose
# file or the image. Then run the command.
#
# Before that, refuse to start on placeholder secrets: an empty secret file, or a
# credential (a variable named like *PASSWORD*, *SECRET*, *ACCESS_KEY*, *TOKEN*, *API_KEY*,
# *AUTH_STRING*, *_STORE_URI, *DATABASE_URL*, *CONNECTION_URL*, or read from a *_FILE) whose
# value is REPLACE_ME, changeme, password, minioadmin, ... (see is_placeholder). Values are
# never printed. FEDROUND_INSECURE_DEV=1 starts anyway, with a warning: throw-away setups only.
# Provision real secrets with deployments/make-secrets.sh (compose) or your secret manager
# (Kubernetes); see deployments/README.md.
set -eu

insecure_dev() {
  case "$(printf '%s' "${FEDROUND_INSECURE_DEV:-}" | tr '[:upper:]' '[:lower:]')" in
    1 | true | yes | on) return 0 ;;
  esac
  return 1
}

is_placeholder() { # value: the same list as fedround.tasks.runtime.is_placeholder_credential
  lowered="$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')"
  case "$lowered" in
    replace_me | replaceme | replace-me | changeme | change_me | change-me | changeit | \
      password | secret | minioadmin | akiaiosfodnn7example | \
      wjalrxutnfemi/k7mdeng/bpxrficyexamplekey) return 0 ;;
    *replace_me* | *changeme* | '<'*'>' | '${'* | '$('*) return 0 ;;
  esac
  return 1
}

is_credential() { # variable name
  case "$1" in
    *PASSWORD* | *SECRET* | *ACCESS_KEY* | *TOKEN* | *API_KEY* | *AUTH_STRING* | \
      *_STORE_URI | *DATABASE_URL* | *CONNECTION_URL* | MINIO_ROOT_USER) return 0 ;;
  esac
  return 1
}

refused=0
refuse() { # name, what is wrong with it
  if insecure_dev; then
    echo "docker-entrypoint: WARNING: $1 $2; starting anyway because FEDROUND_INSECURE_DEV" \
      "is set: never run like this outside a throw-away local setup" >&2
  else
    echo "docker-entrypoint: $1 $2" >&2
    refused=1
  fi
}

for var in $(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)_FILE=.*/\1/p'); do
  file="$(printenv "${var}_FILE")" || continue
  if [ ! -r "$file" ]; then
    echo "docker-entrypoint: ${var}_FILE=$file is not readable" >&2
    exit 1
  fi
  value="$(cat "$file")"
  if [ -z "$(printf '%s' "$value" | tr -d '[:space:]')" ]; then
    refuse "${var}_FILE=$file" "is empty"
  fi
  export "$var=$value"
  unset "${var}_FILE"
done

for var in $(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p'); do
  is_credential "$var" || continue
  value="$(printenv "$var")" || continue
  if is_placeholder "$value"; then
    refuse "$var" "holds a placeholder or default value"
  fi
done

if [ "$refused" -ne 0 ]; then
  echo "docker-entrypoint: refusing to start with placeholder secrets: provision real ones" \
    "(deployments/make-secrets.sh for compose; your secret manager or a filled-in" \
    "deployments/k8s/secrets.yaml for Kubernetes; see deployments/README.md)" >&2
  exit 1
fi
exec "$@"
