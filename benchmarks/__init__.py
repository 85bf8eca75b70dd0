"""Benchmarks of saep-kernels (not part of the installed package).

    python -m benchmarks            # default run on the present device: table, JSON/CSV, plots
    python -m benchmarks --help
"""
