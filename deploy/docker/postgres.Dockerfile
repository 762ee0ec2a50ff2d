# PostgreSQL for the job coordinator (NOVELCRAFTER_DB=postgresql://USER:PASSWORD@postgres:5432/DB),
# from Debian's packages on the Python 3.11 base of the other images (a Debian bookworm), so that
# `make images` builds it where no registry image can be pulled. Build from the repository root:
#   docker build -f deploy/docker/postgres.Dockerfile -t novelcrafter/postgres:latest .   (or: make images)
# Like the official postgres image: POSTGRES_USER, POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE)
# and POSTGRES_DB set up the database on first start (deploy/docker/postgres-entrypoint.sh);
# the data lives in the volume /var/lib/postgresql/data; port 5432, password logins only.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
ENV PGDATA=/var/lib/postgresql/data
# The postgres user gets the official image's uid/gid (999), so volumes move between the two.
# Debian's package would create a cluster of its own and start it: the entrypoint makes the
# one this image runs, so the package creates none.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/bash postgres \
 && mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/no-main-cluster.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin \
 && mkdir -p "$PGDATA" /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
 && chmod 700 "$PGDATA"
ENV PATH=/usr/lib/postgresql/bin:$PATH
COPY deploy/docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# A fast shutdown on `docker stop`: clients are disconnected, committed data stays.
STOPSIGNAL SIGINT
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "pg_isready -q -h 127.0.0.1 -p 5432 -U \"${POSTGRES_USER:-postgres}\" -d \"${POSTGRES_DB:-${POSTGRES_USER:-postgres}}\""]
ENTRYPOINT ["postgres-entrypoint.sh"]
CMD ["postgres"]
