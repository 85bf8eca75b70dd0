"""Build script of saep-kernels.

Python packages: ``saep_kernels`` and the Triton kernels (``triton_kernels/``, installed as
``saep_kernels.triton_kernels``). Compiled extension ``saep_kernels._C``: the CPU kernels
always, the CUDA kernels when the installed torch has CUDA and nvcc is found. It builds
against the torch already installed, so install with ``pip install --no-build-isolation .``
(the Makefile does).

Environment:
    SAEP_SKIP_BUILD=1       pure-Python install (no compiled backends)
    SAEP_SKIP_CUDA=1        do not build the CUDA kernels
    SAEP_FORCE_CUDA=1       build them even if torch sees no GPU at build time (needs nvcc)
    SAEP_REQUIRE_EXTENSION=1  fail the install if the extension does not build (default: warn
                            and install without it; saep_kernels.available_backends() tells)
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0": A100, H100/H200)
    MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import setup

PACKAGES = ["saep_kernels", "saep_kernels.integrations", "saep_kernels.triton_kernels"]
PACKAGE_DIR = {"saep_kernels": "saep_kernels",
               "saep_kernels.triton_kernels": "triton_kernels"}


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _warn(message):
    print(f"saep-kernels setup: WARNING: {message}", file=sys.stderr)


def _extensions():
    """(ext_modules, cmdclass) for saep_kernels._C, or ([], {}) when it cannot be built."""
    if _flag("SAEP_SKIP_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError as exc:
        _warn(f"torch is not importable while building ({exc}); installing without the "
              "compiled kernels. Install torch first, then pip install --no-build-isolation .")
        return [], {}

    # csrc/cpu/isa/: the CPU kernels again, for AVX2 and AVX-512 (csrc/cpu/task.h)
    sources = ["csrc/binding.cpp", "csrc/cpu/fused_aggregate_fwd.cpp",
               "csrc/cpu/fused_aggregate_bwd.cpp", "csrc/cpu/cpu_capability.cpp",
               *sorted(glob.glob("csrc/cpu/isa/*.cpp"))]
    # no -std here: torch's BuildExtension adds the standard its own headers are written for
    # (C++17 or C++20 by torch version); the kernels compile under both
    cxx = ["-O3", "-Wno-unknown-pragmas"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp it runs on one thread
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    has_cuda_torch = torch.version.cuda is not None
    with_cuda = (not _flag("SAEP_SKIP_CUDA") and has_cuda_torch and CUDA_HOME is not None
                 and (torch.cuda.is_available() or _flag("SAEP_FORCE_CUDA")))
    if has_cuda_torch and not with_cuda and not _flag("SAEP_SKIP_CUDA"):
        why = "nvcc was not found (set CUDA_HOME)" if CUDA_HOME is None else \
            "no GPU is visible (SAEP_FORCE_CUDA=1 builds anyway)"
        _warn(f"building without the CUDA kernels: {why}")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "saep_kernels._C",
            sources + ["csrc/binding_cuda.cpp", "csrc/cuda/fused_aggregate_fwd.cu",
                       "csrc/cuda/fused_aggregate_bwd.cu"],
            define_macros=[("SAEP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("saep_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension with ninja; a failed build warns instead of failing the
        install (unless SAEP_REQUIRE_EXTENSION=1)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, broken toolchain, ...
                if _flag("SAEP_REQUIRE_EXTENSION"):
                    raise
                _warn(f"could not build saep_kernels._C ({exc}); installing without the "
                      "C++/CUDA backends")

    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(max(1, os.cpu_count() or 1))
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
