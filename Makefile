# ambient-agent developer targets. Every target installs what it needs, so each works on a fresh
# Debian 12 machine (apt packages are installed when running as root).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP := $(VENV)/.installed-stamp
APT_STAMP := $(VENV)/.apt-stamp
APT_PACKAGES := nftables iproute2 etcd-server openssl procps haproxy python3-venv
# The image's interpreter (Debian's python3, see Dockerfile) in a venv of its own: `make bench` runs
# the agents on it, as they run in the product, not on whichever Python made .venv.
IMAGE_PYTHON ?= /usr/bin/python3
IMAGE_VENV := .venv-image
IMAGE_STAMP := $(IMAGE_VENV)/.installed-stamp
CLUSTER_DIR ?= /run/ambient-agent/cluster

.PHONY: help setup apt control-plane unit e2e test lint bench cluster-up cluster-down demo clean image manifests e2e-kind

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev,speed]'
	touch $@

$(APT_STAMP): Makefile | $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing apt packages:" $$missing; \
	    apt-get update -qq || true; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	  touch $@; \
	else echo "not root: skipping apt packages ($(APT_PACKAGES))"; fi

setup: $(STAMP) $(APT_STAMP) ## create .venv with the project and dev tools; apt packages when root

$(IMAGE_STAMP): pyproject.toml | $(APT_STAMP)
	$(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q -e '.[speed]'
	touch $@

control-plane: setup ## build (once, cached) kube-apiserver/controller-manager/scheduler v1.20.2
	@if [ "$$(id -u)" = 0 ]; then scripts/build-control-plane.sh; \
	else echo "not root: cannot build the control plane (e2e tests will be skipped)"; fi

unit: setup ## run the unit tests
	$(PYTEST) -q tests/unit

e2e: control-plane ## run the end-to-end tests on the local network-namespace cluster (root)
	$(PYTEST) -q tests/e2e

test: control-plane lint ## run every check: lint, unit and e2e tests
	$(PYTEST) -q tests

lint: setup ## ruff, mypy --strict on agent/, import-linter layering contracts
	$(VENV)/bin/ruff check agent tests
	$(VENV)/bin/ruff format --check agent tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: control-plane $(IMAGE_STAMP) ## run every benchmarks/bench_*.py (root); each prints a table to record in docs/benchmarks.md
	@for script in benchmarks/bench_*.py; do \
	  module=benchmarks.$$(basename "$$script" .py); \
	  echo "== $$module"; \
	  AMBIENT_BENCH_AGENT_PYTHON=$(CURDIR)/$(IMAGE_VENV)/bin/python $(VPY) -m "$$module"; \
	done

image: ## build the container image (local debootstrap base, buildah), run --help and unit tests in it (root)
	scripts/build-image.sh

manifests: setup ## regenerate manifests/ambient-agent.yaml from the Helm chart (Helm's engine, no helm binary)
	$(VPY) scripts/render-manifests.py

e2e-kind: setup ## the e2e scenarios on a kind cluster from the Helm chart (skips without docker/kind/helm)
	tests/e2e/kind/run.sh

cluster-up: control-plane ## start a local two-node cluster (namespaces, real API server) and keep it
	$(VPY) -m tests.e2e.cluster up --state-dir $(CLUSTER_DIR)

demo: control-plane ## local cluster + CA + node agents; enrol a demo namespace, show the tunnel and a DENY policy (root; left running)
	$(VPY) -m tests.e2e.demo --state-dir $(CLUSTER_DIR)

cluster-down: setup ## stop the local cluster and remove everything it created
	$(VPY) -m tests.e2e.cluster down --state-dir $(CLUSTER_DIR)

clean: cluster-down ## remove the local cluster and the virtualenvs
	rm -rf $(VENV) $(IMAGE_VENV)
