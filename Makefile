# controlplane: `make run` serves the whole system; `make test` runs the tests.
# Both set up .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
WORKER_NICE ?= 10

.PHONY: run web worker gpu-worker otlp-grpc beat migrate test lint demo clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

migrate: $(STAMP)
	@$(PY) manage.py migrate --noinput -v 0

## Embedded: one process, SQLite, no PostgreSQL or Redis needed. PORT overrides 8000.
run: migrate
	@$(PY) manage.py ensure_admin
	exec $(PY) manage.py serve

## Production-style processes (set DATABASE_URL and REDIS_URL).
web: migrate
	exec $(PY) manage.py serve --host 0.0.0.0 --no-worker

## The worker yields the CPU to the web process (WORKER_NICE, default 10): clients wait on accepts,
## nobody waits on a projection a few milliseconds later. WORKER_CONCURRENCY: prefork children.
worker: $(STAMP)
	exec nice -n $(WORKER_NICE) $(VENV)/bin/celery -A controlplane worker -Q default,ingest -l INFO \
		$(if $(WORKER_CONCURRENCY),--concurrency $(WORKER_CONCURRENCY))

## The GPU queue's worker, on a GPU host: it consumes its own GPUs' queues (NVML, else SCHEDULER_DECLARED_GPUS),
## one message at a time per process, late-acked. GPU_WORKER_CONCURRENCY: tasks at once (default 4).
gpu-worker: $(STAMP)
	exec $(VENV)/bin/celery -A controlplane worker -n gpu@%h -l INFO --prefetch-multiplier 1 \
		-Q $$($(PY) manage.py scheduler_queues) --concurrency $(or $(GPU_WORKER_CONCURRENCY),4)

otlp-grpc: migrate
	exec $(PY) manage.py otlp_grpc --host 0.0.0.0

beat: $(STAMP)
	exec $(VENV)/bin/celery -A controlplane beat -l INFO

## Realistic agent traffic through the REST API into project "demo" (DEMO_ARGS="--url http://127.0.0.1:8000" to send to a running server).
demo: migrate
	$(PY) manage.py demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest --create-db $(PYTEST_ARGS)

## ruff, no missing migration, and the layer order of STYLE.md §1 (import-linter contracts in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/lint-imports --no-cache --no-logo

clean:
	rm -rf $(VENV) var
