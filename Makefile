# signal-server: `make run` starts a dev server, `make test` runs every test.
# Both create .venv and install what they need on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A network namespace whose only interface is loopback, for the WebRTC tests
# (browsers gather ICE candidates on every interface). Root makes it directly;
# others through a user namespace.
NETNS := unshare $(if $(filter 0,$(shell id -u)),-n,-rn) -- sh -c
IN_NETNS = $(NETNS) 'ip link set lo up && exec $(1)' 
# command:Debian package, installed only when the command is missing (node and
# npm may come from elsewhere; Debian's npm would conflict with them).
SYSTEM_COMMANDS := redis-server:redis-server redis-sentinel:redis-sentinel chromium:chromium ip:iproute2 \
	unshare:util-linux haproxy:haproxy node:nodejs npm:npm nginx:nginx systemd-analyze:systemd \
	faketime:faketime

.PHONY: run run-cluster test lint bench screenshot system-deps bench-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes.
$(VENV)/.installed-run: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[speed,cluster]'
	touch $@

$(VENV)/.installed-dev: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## run: a dev server on 127.0.0.1:8080 (override with SIGNAL_* variables)
run: $(VENV)/.installed-run
	exec $(BIN)/signal-server

## run-cluster: redis-server, three nodes and nginx round-robin on 127.0.0.1:8080 (PORT=...)
run-cluster: $(VENV)/.installed-run system-deps
	exec $(BIN)/python -m tools.run_cluster

## system-deps: Debian packages the tests drive (installed only when missing)
system-deps:
	@missing=""; \
	for pair in $(SYSTEM_COMMANDS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## test: the whole suite, services included; WebRTC tests in a loopback-only namespace
test: $(VENV)/.installed-dev $(VENV)/.installed-run system-deps
	@status=0; \
	$(BIN)/python -m pytest -m "not netns" || status=$$?; \
	$(call IN_NETNS,$(BIN)/python -m pytest -m netns) || status=$$?; \
	exit $$status

## screenshot: docs/screenshot.png, a real two-party call in the demo page
screenshot: $(VENV)/.installed-dev system-deps
	$(call IN_NETNS,$(BIN)/python -m tests.screenshot)

## bench: every scenario 3 times against PeerJS and the aiohttp floor, the cluster ones, the failover, the join and
## resume storms in rounds, webhooks and memory per idle connection (about 40 minutes), then docs/benchmarks.md,
## docs/benchmarks.png and docs/failover.png
bench: $(VENV)/.installed-bench bench-deps
	cd bench && npm install --no-audit --no-fund --loglevel=error
	$(BIN)/python bench/run.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/joins.py
	$(BIN)/python bench/webhooks.py
	$(BIN)/python bench/instructions.py
	$(BIN)/python bench/memory.py --connections 10000 --keepalive --traced-connections 0
	$(BIN)/python bench/memory.py --connections 1000
	$(BIN)/python bench/report.py

$(VENV)/.installed-bench: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

bench-deps: system-deps
	@command -v valgrind >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends valgrind; }

## lint: ruff and mypy
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
