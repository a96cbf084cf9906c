# finetune-operator: the commands (see README.md). Every target installs what it needs on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer_image/src
export DS_ACCELERATOR ?= cpu

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): # the name carries the content hash of both files: a checkout newer than the venv is no reason to reinstall
	@echo "==> creating $(VENV) with pinned dependencies (first time: ~3 GB download for torch, a few minutes)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(VENV)/bin/pip install -q uv==0.13.8
	@# torch first: DeepSpeed's setup.py imports it, so DeepSpeed is built without build isolation.
	@$(VENV)/bin/uv pip install --python $(PY) -c constraints.txt torch==2.15.0
	@$(VENV)/bin/uv pip install --python $(PY) -c constraints.txt --no-build-isolation-package deepspeed -e '.[trainer,dev]'
	@rm -f $(VENV)/.installed-*; touch $@
	@echo "==> $(VENV) ready"

venv: $(STAMP) ## the Python environment only

tools: ## build (or find cached) the dev-cluster binaries
	@hack/build-tools.sh >/dev/null

kueue: ## build (or find cached) Kueue's manager, for the Kueue tests (tests/cluster/test_kueue.py)
	@hack/build-tools.sh kueue >/dev/null

setup: venv tools ## venv with pinned deps + the dev-cluster binaries

cluster-up: setup ## start the dev cluster (idempotent)
	@$(PY) -m hack.devcluster up

cluster-down: ## stop the dev cluster's processes
	@test -x $(PY) && $(PY) -m hack.devcluster down || true

kubeconfig: ## print the dev cluster's kubeconfig path
	@$(PY) -m hack.devcluster kubeconfig

install-crds: venv ## apply crds/ to the current cluster
	@$(PY) -m hack.devcluster kubectl apply --server-side -f crds/

run: venv ## run the operator against the current cluster (all namespaces; /healthz :8080, /metrics :9090)
	@$(PY) -m hack.devcluster exec -- $(PY) -m finetune_operator --all-namespaces --health-port 8080 --metrics-port 9090

crds: venv ## regenerate crds/, docs/api.md and the chart's CRDs from operator/finetune_operator/api
	@$(PY) -m finetune_operator.api.crdgen --out crds/ --docs docs/api.md
	@rm -f helm/finetune-operator/crds/*.yaml && cp crds/*.yaml helm/finetune-operator/crds/

lint: venv ## ruff, mypy (strict), import contracts, CRD drift, chart lint
	@echo "==> ruff"; $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	@echo "==> mypy (strict)"; $(VENV)/bin/mypy
	@echo "==> import contracts"; $(VENV)/bin/lint-imports
	@echo "==> CRD drift"; $(PY) -m finetune_operator.api.crdgen --check crds/ --docs docs/api.md
	@diff -r crds helm/finetune-operator/crds || { echo "helm chart CRDs are stale: run 'make crds'"; exit 1; }
	@echo "==> helm lint"; "$$(hack/build-tools.sh 2>/dev/null | tail -1)/helm" lint helm/finetune-operator

unit: venv ## fast tests, no cluster
	$(PY) -m pytest -m "not cluster and not e2e" -q

cluster-test: setup kueue ## tests against the dev cluster
	$(PY) -m pytest -m "cluster or e2e" -q

test: setup kueue lint ## everything: lint, unit, cluster and e2e tests
	$(PY) -m pytest -q

bench: setup ## run benchmarks/, one JSON line each
	@for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

demo: setup ## dev cluster → CRDs → operator → example FineTuneJob → ModelDeployment → a request answered
	@$(PY) hack/demo.py

.PHONY: help venv tools kueue setup cluster-up cluster-down kubeconfig install-crds run crds lint unit cluster-test test bench demo
