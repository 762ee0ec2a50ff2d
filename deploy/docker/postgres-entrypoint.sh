#!/usr/bin/env bash
# Entrypoint of novelcrafter/postgres (deploy/docker/postgres.Dockerfile): the job coordinator's
# database, set up the way the official postgres image does it.
#
# On first start (an empty $PGDATA, default /var/lib/postgresql/data) it runs initdb with
#   POSTGRES_USER      the superuser, owner of the database (default: postgres)
#   POSTGRES_PASSWORD  its password (required; or POSTGRES_PASSWORD_FILE, a file holding it)
#   POSTGRES_DB        a database created for it (default: $POSTGRES_USER)
# and lets every address in with scram-sha-256 passwords (no trust, no ident). Later starts
# keep what is in $PGDATA and ignore those variables. The server listens on every interface
# (0.0.0.0 and ::), port 5432. Started as root, it prepares $PGDATA and runs as postgres (uid 999);
# started as a non-root user (Kubernetes runAsUser), it runs as that user.
# Arguments: postgres options (`-c name=value …`), or another command to run instead.
set -euo pipefail

export PGDATA=${PGDATA:-/var/lib/postgresql/data}

fail() { echo "postgres-entrypoint: error: $*" >&2; exit 1; }
note() { echo "postgres-entrypoint: $*"; }

if [ "${1:-}" = "" ] || [ "${1:0:1}" = "-" ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    HOME=/var/lib/postgresql exec setpriv --reuid=postgres --regid=postgres --init-groups -- "${BASH_SOURCE[0]}" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        [ -z "${POSTGRES_PASSWORD:-}" ] || fail "set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, not both"
        [ -r "$POSTGRES_PASSWORD_FILE" ] || fail "POSTGRES_PASSWORD_FILE=$POSTGRES_PASSWORD_FILE is not readable"
        POSTGRES_PASSWORD=$(<"$POSTGRES_PASSWORD_FILE")
    fi
    [ -n "${POSTGRES_PASSWORD:-}" ] || fail "the database is not initialised and POSTGRES_PASSWORD is empty:
  set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) for the superuser POSTGRES_USER"
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    note "initialising $PGDATA: superuser $user, database $db"

    pwfile=$(mktemp)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --auth=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    trap - EXIT

    cat >>"$PGDATA/postgresql.conf" <<'EOF'

# novelcrafter/postgres: every interface, port 5432 (pg_hba.conf asks for a password).
listen_addresses = '*'
port = 5432
EOF
    cat >>"$PGDATA/pg_hba.conf" <<'EOF'

# novelcrafter/postgres: any address, with a password (scram-sha-256).
host    all             all             all                     scram-sha-256
EOF

    if [ "$db" != postgres ]; then
        # A server on a private socket only (no TCP: the health check stays red meanwhile).
        socket_dir=$(mktemp -d)
        pg_ctl -D "$PGDATA" -w -s -o "-c listen_addresses='' -k $socket_dir" start
        echo 'CREATE DATABASE :"db" OWNER :"owner"' \
            | PGPASSWORD=$POSTGRES_PASSWORD psql -X -q -v ON_ERROR_STOP=1 -h "$socket_dir" \
                --username="$user" --dbname=postgres -v db="$db" -v owner="$user"
        pg_ctl -D "$PGDATA" -w -s -m fast stop
        rmdir "$socket_dir"
    fi
    note "initialised"
fi

exec "$@"
