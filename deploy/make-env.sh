#!/bin/sh
# Write .env for docker compose from .env.example with a new random value for every
# `change-me-…` placeholder (the services refuse placeholders and secrets under 16
# characters). An existing .env is kept; only placeholders still in it are replaced.
#   deploy/make-env.sh [ENV_FILE]        (make env)
set -eu
example="$(dirname "$0")/../.env.example"
target=${1:-.env}
[ -f "$target" ] || { cp "$example" "$target"; chmod 600 "$target"; created=1; }
secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT
replaced=0
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        [A-Z]*=change-me-*) line="${line%%=*}=$(secret)"; replaced=$((replaced + 1)) ;;
    esac
    printf '%s\n' "$line"
done < "$target" > "$tmp"
chmod 600 "$tmp"
mv "$tmp" "$target"
echo "${created:+created }$target: $replaced secret(s) generated (keep this file private; never commit it)"
