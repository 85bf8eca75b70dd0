"""Build script: the Python packages (``triton_kernels/`` is installed as
``saep_kernels.triton_kernels``)."""

from setuptools import setup

setup(
    packages=["saep_kernels", "saep_kernels.triton_kernels"],
    package_dir={"saep_kernels": "saep_kernels", "saep_kernels.triton_kernels": "triton_kernels"},
)
