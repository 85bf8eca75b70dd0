# saep-kernels: the two commands of the README, and their set-up.
#
#   make bench   set up, then run the default benchmark on the present device
#   make test    set up, then run the whole test suite (what .ci/run runs): the C++ tests
#                (CMake + ctest, built with AddressSanitizer and UBSan; the CUDA kernels
#                compiled with nvcc for sm_80/sm_90 when nvcc is there), the LLaVA codebase's
#                pinned packages into build/llava-site (for tests/test_llava_codebase.py), then
#                pytest
#
# The C++ tests are built once, with the sanitizers: the kernels optimised as users run them
# (-O3) are the extension's, which pytest tests against the reference. A plain CMake build of
# the same tests took as long to compile as the extension (six kernel units, 2.7-4.6 min each,
# two at a time on 2 cores: 12.1 min) and checked nothing the sanitized build and pytest do not.
#
# Set-up keeps an installed torch (never up- or downgrades a user's GPU build); with no
# torch it installs torch==2.13.0 (a CPU build on machines that have that wheel on disk).
# Where a C++ compiler is found the extension must build (SAEP_REQUIRE_EXTENSION=1): a broken
# build fails the command instead of installing without the compiled backends, and the test
# suite checks that every backend it expects here is present (tests/test_backends.py).

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

CMAKE_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
REQUIRE_EXTENSION := $(if $(shell command -v $${CXX:-c++} 2>/dev/null),1,0)

.PHONY: setup bench test cpp-test llava-site gpu-resources cuda-build-check clean

setup:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "setup: keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "setup: no torch found, installing $(TORCH_SPEC)"; \
		$(PIP) install --disable-pip-version-check -q "$(TORCH_SPEC)"; \
	fi
	$(PIP) install --disable-pip-version-check -q "setuptools>=64" wheel ninja
	SAEP_REQUIRE_EXTENSION=$(REQUIRE_EXTENSION) $(PIP) install --disable-pip-version-check -q \
		--no-build-isolation -e ".[test,bench,transformers]"

bench: setup
	$(PYTHON) -m benchmarks $(ARGS)

test: setup cpp-test llava-site
	$(PYTHON) -m pytest -q $(ARGS)

# The LLaVA codebase (llava-torch) with the transformers it pins, installed without
# dependencies into build/llava-site for tests/test_llava_codebase.py (seconds; reinstalled
# when the requirements change). It goes ahead of the main environment on PYTHONPATH in
# that test's subprocess only.
LLAVA_SITE := build/llava-site
llava-site: $(LLAVA_SITE)/.installed

$(LLAVA_SITE)/.installed: tests/llava-codebase-requirements.txt
	rm -rf $(LLAVA_SITE)
	$(PIP) install --disable-pip-version-check -q --no-deps --target $(LLAVA_SITE) \
		-r tests/llava-codebase-requirements.txt
	touch $@

cpp-test:
	@if ! command -v cmake >/dev/null 2>&1; then echo "cpp-test: cmake not found, C++ tests skipped"; exit 0; fi; \
	set -e; \
	cmake -S . -B build/cmake-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAEP_SANITIZE=ON > build-cmake-asan.log 2>&1 || (cat build-cmake-asan.log; exit 1); \
	grep "saep:" build-cmake-asan.log || true; \
	cmake --build build/cmake-asan -j $(CMAKE_JOBS); \
	ctest --test-dir build/cmake-asan --output-on-failure; \
	rm -f build-cmake-asan.log

# Every GPU kernel variant a user can reach, compiled offline for sm_90 and sm_80 (no GPU;
# a few minutes on 2 cores): registers, spills, shared memory, 16-byte accesses, occupancy.
# `make test` checks the covering set (tests/test_gpu_resources.py).
gpu-resources: setup
	env -u TRITON_INTERPRET $(PYTHON) scripts/gpu_resources.py --all --arch 90 80 \
		--markdown docs/gpu_resources.md

# The whole extension (CPU + CUDA kernels, sm_80/sm_90) built against the GPU image's torch
# 2.11.0+cu130 with this machine's nvcc, then the CPU tests against that build (downloads
# about 2.6 GB once into ~/.cache/saep-kernels; not part of CI).
cuda-build-check:
	bash scripts/cuda_build_check.sh $(ARGS)

clean:
	rm -rf build dist *.egg-info saep_kernels/*.so .pytest_cache .hypothesis benchmarks/out build-cmake*.log
