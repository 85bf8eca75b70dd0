"""Facts that must also be written outside their Python home agree with it: the C++ kernel
tests' tolerance table (csrc/tests/kernel_check.h) with saep_kernels.testing, and the reference
configuration table of docs/op.md with saep_kernels.configs."""

import re
from pathlib import Path

import torch

from saep_kernels.configs import REFERENCE_CONFIGS
from saep_kernels.testing import FORWARD_TOLERANCES, REDUCTION_RTOL

ROOT = Path(__file__).resolve().parents[1]
CPP_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16}


def _number(text: str) -> float:
    """A C++ double literal or a quotient of two (``1.0 / 1024``)."""
    parts = [float(p) for p in text.split("/")]
    return parts[0] / parts[1] if len(parts) == 2 else parts[0]


def test_cpp_forward_tolerances_are_python_ones():
    header = (ROOT / "csrc/tests/kernel_check.h").read_text()
    body = header[header.index("forward_tolerance(DType d)"):]
    body = body[:body.index("\n}\n")]
    rows = re.findall(r"case DType::(\w+): return \{([^,]+), ([^}]+)\};", body)
    assert {name for name, _, _ in rows} == set(CPP_DTYPES)
    for name, rtol, atol in rows:
        want = FORWARD_TOLERANCES[CPP_DTYPES[name]]
        assert (_number(rtol), _number(atol)) == (want["rtol"], want["atol"]), name


def test_cpp_reduction_tolerances_are_python_ones():
    # the kernels' partial sums are in the compute type: fp64 for fp64, fp32 otherwise
    header = (ROOT / "csrc/tests/kernel_check.h").read_text()
    line = next(x for x in header.splitlines() if "double reduction_rtol(DType d)" in x)
    f64, other = re.search(r"DType::F64 \? ([\d.e-]+) : ([\d.e-]+);", line).groups()
    assert float(f64) == REDUCTION_RTOL[torch.float64]
    assert float(other) == REDUCTION_RTOL[torch.float32]


def test_docs_configuration_table_is_the_configs_module():
    doc = (ROOT / "docs/op.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in REFERENCE_CONFIGS:
            rows[cells[0]] = cells
    assert set(rows) == set(REFERENCE_CONFIGS)
    for name, cfg in REFERENCE_CONFIGS.items():
        _, tower, grid, channels, prefix, layers, llm_dim = rows[name]
        assert tower == cfg.tower
        assert grid == f"{cfg.height}x{cfg.width}"
        assert (int(channels), int(prefix), int(layers), int(llm_dim)) == \
            (cfg.channels, cfg.prefix, cfg.layers, cfg.llm_dim)
