# Two commands do all the set-up on a fresh machine:
#   make demo   installs limner and its three plugins, then runs limner offline on the tiny
#               models
#   make test   installs those and the test tools (Ray, mypy, Selenium, ...), then runs the
#               fast lane of the test suite (a few minutes)
# `make check` runs every test (Ray clusters, Chromium, subprocesses, wheel builds, the
# minute-long loads) and lint: what CI runs. `make dist` builds the four wheels (limner and
# its three plugins) into dist/. Both installs go into the one .venv: `make test` after
# `make demo` adds only the test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned. On Linux, PyPI's torch is the CUDA build (2.6 GB of wheels, 15 nvidia-*
# among them); `make demo CPU=1` takes the CPU build (180 MB) from PyTorch's own index
# instead. A machine whose pip finds the CPU wheel locally (find-links) takes it without.
# Another release: e.g. `make test TORCH='torch==2.9.1'`.
ifdef CPU
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
TORCH ?= torch==2.13.0
PLUGINS := plugins/clip plugins/flux plugins/sd35
# Tested in place, not installed (see pytest's pythonpath in pyproject.toml).
EXAMPLES := examples/plugins/limner-acme examples/plugins/limner-acme-diffusion
DEMO_OUT ?= out
DIST ?= dist

PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check \
	$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
PROJECTS := pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))

.PHONY: install install-demo demo test check lint format bench dist clean

install: $(VENV)/.installed
install-demo: $(VENV)/.installed-demo

# What the demo runs: the core and the plugins (editable), torch pinned in the same resolve.
$(VENV)/.installed-demo: $(PROJECTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" -e . $(addprefix -e ,$(PLUGINS))
	touch $@

# And the development tools, for the tests, lint and benchmarks.
$(VENV)/.installed: $(VENV)/.installed-demo $(PROJECTS)
	$(PIP) "$(TORCH)" -e ".[dev]" $(addprefix -e ,$(PLUGINS))
	touch $@

demo: install-demo
	HF_HUB_OFFLINE=1 $(BIN)/limner models
	HF_HUB_OFFLINE=1 $(BIN)/limner embed examples --model limner/tiny-clip --npy $(DEMO_OUT)/embeddings.npy
	HF_HUB_OFFLINE=1 $(BIN)/limner embed --text "a red fox" "a lighthouse at dusk" --model limner/tiny-clip --json | cut -c1-120
	HF_HUB_OFFLINE=1 $(BIN)/limner generate "a lighthouse at dusk" --model limner/tiny-flux --seed 7 --out $(DEMO_OUT)/tiny-flux.png
	HF_HUB_OFFLINE=1 $(BIN)/limner generate "a lighthouse at dusk" --model limner/tiny-sd35 --seed 7 --out $(DEMO_OUT)/tiny-sd35.png

# The fast lane: every test without a marker of the slow lanes (pyproject.toml lists them).
FAST := not slow and not subprocess and not ray and not browser and not packaging

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "$(FAST)"

# Every test, the slowest 25 named at the end, then lint.
check: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --durations=25
	$(MAKE) lint

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	for plugin in $(PLUGINS) $(EXAMPLES); do $(BIN)/mypy $$plugin/tests || exit 1; done

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Only a virtual environment with pip is needed: the wheels build in pip's isolated
# environments (hatchling), without torch.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

dist: $(BIN)/python
	rm -rf $(DIST)
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps \
		--wheel-dir $(DIST) . $(PLUGINS)
	@ls $(DIST)

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/clip_e2e.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/pool_load.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DIST) .pytest_cache .mypy_cache .ruff_cache
