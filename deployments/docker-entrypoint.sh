#!/bin/sh
# For each NAME_FILE=/path in the environment, export NAME with that file's content, so
# secrets arrive as files (docker secrets, mounted k8s Secrets) and never in the compose
# file or the image. Then run the command.
set -eu
for var in $(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)_FILE=.*/\1/p'); do
  file="$(printenv "${var}_FILE")"
  if [ ! -r "$file" ]; then
    echo "docker-entrypoint: ${var}_FILE=$file is not readable" >&2
    exit 1
  fi
  export "$var=$(cat "$file")"
  unset "${var}_FILE"
done
exec "$@"
