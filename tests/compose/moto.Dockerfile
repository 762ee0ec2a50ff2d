# moto's S3 server, standing in for MinIO in the compose test (tests/compose/s3-moto.yml):
# MinIO's images cannot be pulled everywhere the suite runs; this builds from PyPI on the
# same Python base as the NovelCrafter images.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG MOTO_VERSION=5.2.5
ENV PATH=/opt/moto/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/moto \
 && pip install "moto[server]==${MOTO_VERSION}"
USER 10001:10001
EXPOSE 9000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
