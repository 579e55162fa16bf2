# signal-server: `make run` starts a dev server, `make test` runs every test.
# Both create .venv and install what they need on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := redis-server chromium iproute2 util-linux nodejs npm

.PHONY: run test lint bench screenshot system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes.
$(VENV)/.installed-run: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[speed]'
	touch $@

$(VENV)/.installed-dev: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## run: a dev server on 127.0.0.1:8080 (override with SIGNAL_* variables)
run: $(VENV)/.installed-run
	exec $(BIN)/signal-server

## system-deps: Debian packages the tests drive (installed only when missing)
system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## test: the whole suite, services included
test: $(VENV)/.installed-dev system-deps
	$(BIN)/python -m pytest

## lint: ruff and mypy
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
