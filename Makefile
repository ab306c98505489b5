# The two commands a newcomer needs: `make run` (bring everything up) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run run-cluster test lint bench schemas api-key clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m deploy.local.debian
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# PostgreSQL (apt if missing), Kafka (jars from Maven Central), the three services; Ctrl-C stops all.
run: install
	$(PY) -m deploy.local.stack

# The same on a three-node Kafka cluster (topics: replication factor 3, min.insync.replicas 2).
run-cluster: install
	$(PY) -m deploy.local.stack --kafka-cluster

test: install
	$(PY) -m pytest

# ruff (lint, import order, format) and mypy on the whole tree; settings in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The performance harness (docs/performance.md); not part of `make test`. Results in bench/results/.
bench: install
	$(PY) -m bench

# Regenerate schemas/events/ and schemas/webhooks/ from their models (shared/schemas.py; a test fails while they differ).
schemas: install
	$(PY) -m shared.schemas

# Create an API key on the database of `make run` (printed once): make api-key NAME=shop [WEIGHT=3]
api-key: install
	$(PY) -m services.api.keys create "$(NAME)" --weight "$(or $(WEIGHT),1)"

# Everything `make run` keeps: the PostgreSQL cluster (as root it lives in /var/tmp/imgpipe-postgres,
# outside .local), Kafka's log, stored images and logs, and make bench's own cluster. The installs (.venv,
# Kafka's jars in .cache) stay.
clean:
	-$(PYTHON) -m deploy.local.kafka stop
	$(PYTHON) -m deploy.local.postgres remove
	$(PYTHON) -m deploy.local.postgres remove --data-dir .local/bench/postgres
	rm -rf .local
