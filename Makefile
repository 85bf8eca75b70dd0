# saep-kernels: the two commands of the README, and their set-up.
#
#   make bench   set up, then run the default benchmark on the present device
#   make test    set up, then run the whole test suite (what .ci/run runs)
#
# Set-up keeps an installed torch (never up- or downgrades a user's GPU build); with no
# torch it installs torch==2.13.0 (a CPU build on machines that have that wheel on disk).

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: setup bench test clean

setup:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "setup: keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "setup: no torch found, installing $(TORCH_SPEC)"; \
		$(PIP) install --disable-pip-version-check -q "$(TORCH_SPEC)"; \
	fi
	$(PIP) install --disable-pip-version-check -q "setuptools>=64" wheel ninja
	$(PIP) install --disable-pip-version-check -q --no-build-isolation -e ".[test,bench]"

bench: setup
	$(PYTHON) -m benchmarks $(ARGS)

test: setup
	$(PYTHON) -m pytest -q $(ARGS)

clean:
	rm -rf build dist *.egg-info saep_kernels/*.so .pytest_cache .hypothesis benchmarks/out
