# Thin targets; see README.md. Everything runs from the project's own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODEL  ?= models/m2fp.onnx
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=
SOAK_SECONDS ?= 1800

.PHONY: help install install-dev run serve model export-random test test-fast lint openapi bench soak clean

help:
	@echo "make run        serve on http://$(HOST):$(PORT) (exports a model first if $(MODEL) is missing)"
	@echo "make test       install everything the tests need and run the whole suite (incl. slow)"
	@echo "make test-fast  the suite without the slow (full-size, real-server) tests"
	@echo "make model      export $(MODEL): the real model from the ModelScope hub, else an untrained demo"
	@echo "make openapi    regenerate openapi/openapi.json"
	@echo "make bench      reference vs ours on a 720p photo (see bench/README.md)"
	@echo "make soak       $(SOAK_SECONDS) s of mixed valid/invalid load on a real server; RSS and fds in bench/results/soak.json"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# opencv-contrib-python-headless replaces opencv-python-headless (same cv2 files): an old venv that
# has the plain one loses both and gets contrib afresh.
define drop_plain_opencv
	@if $(PIP) show -q opencv-python-headless 2>/dev/null; then \
	  $(PIP) uninstall -y -q opencv-python-headless opencv-contrib-python-headless; fi
endef

# Serving needs only the runtime dependencies (no torch).
$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(drop_plain_opencv)
	$(PIP) install -q -e .
	@touch $@

# Exporting and testing need torch + ModelScope (the [export] extra) and the test tools.
$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(drop_plain_opencv)
	$(PIP) install -q -e '.[export,dev]'
	@touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# The real model when the hub is reachable; otherwise the same architecture, untrained, said loudly.
$(MODEL):
	@$(MAKE) --no-print-directory install-dev
	@mkdir -p $(dir $(MODEL))
	@# Exit code 3 = hub unreachable: only then fall back; any other failure stops here.
	$(VENV)/bin/m2fp export -o $(MODEL) || { rc=$$?; [ $$rc -eq 3 ] || exit $$rc; \
	  echo "*** The ModelScope hub is unreachable: exporting an UNTRAINED demo model instead."; \
	  echo "*** Its labels are meaningless. For the real model run: m2fp export --checkpoint DIR -o $(MODEL)"; \
	  $(VENV)/bin/m2fp export --random-init --confident -o $(MODEL); }

model: $(MODEL)

run: $(MODEL) install
	$(VENV)/bin/m2fp serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install-dev
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check src export tests bench
	$(VENV)/bin/mypy src/m2fp_service

openapi: install
	$(VENV)/bin/m2fp openapi -o openapi/openapi.json

bench: install-dev
	$(PY) bench/reference_vs_ours.py

# The CI runs the same test for 60 s; this is the long one.
soak: install-dev
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench/results/soak.json \
	  $(PY) -m pytest tests/integration/test_load.py -k soak -s -p no:cacheprovider --timeout=$$(( $(SOAK_SECONDS) + 900 ))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
