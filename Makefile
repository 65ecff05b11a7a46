# Every install step lives here: CI runs `bash .ci/run` on a clean clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test bench lint clean test-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

$(TSTAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

## make run: the laptop demo (simulator on a pty, agent, local cloud, live view)
run: $(STAMP)
	$(VENV)/bin/edge-sim demo --config config/demo.yaml

## make test: venv with test extras, mosquitto present, then pytest
test: $(TSTAMP) test-deps
	$(PY) -m pytest

# The tests start real brokers (mosquitto) and screenshot the cloud page (chromium);
# as root on Debian we install what is missing, otherwise we say what to install.
test-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium fonts-dejavu-core"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian packages:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "the tests need:$$missing; run 'sudo apt-get install$$missing'" >&2; \
		case "$$missing" in *mosquitto*) exit 1;; esac; \
	fi

lint: $(TSTAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/log_append.py
	$(PY) bench/upstream.py
	$(PY) bench/e2e.py
	$(PY) bench/processing.py
	$(PY) bench/soak.py --minutes 1  # the full run: --minutes 5

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
