"""Tolerances for comparing a backend with the reference, and the comparisons that use them:
the one table saep-kernels' tests and scripts share (and a user checking a backend of their
own can use).

``torch.testing.assert_close`` passes when ``|actual - expected| <= atol + rtol * |expected|``.

Outputs and input gradients. Every backend and the reference compute in fp32 (fp64 for fp64)
from the same inputs and round once to the output dtype, so a result may differ from the
reference by one rounding of that dtype, i.e. one ulp: rtol = 2^-10 for fp16 and 2^-7 for
bf16 (the unit roundoff doubled, since the two roundings may fall on either side). The fp32
arithmetic itself differs only in summation order: at most a few dozen taps of O(1) values,
~1e-6, which atol covers; for fp32 outputs that is the whole budget.

Weight and bias gradients are sums over B*H*W products, accumulated in fp32 (fp64) in another
order than the reference: the error grows like N*eps*sum|terms|, so atol scales with the
magnitude of the gradient (``assert_grad_close(..., reduction=True)``). Gradients stored in
fp16/bf16 (a fp16/bf16 weight) also take one rounding of that dtype.

The C++ kernel tests (csrc/tests/kernel_check.h) compare with a naive loop in double using
the same figures; tests/test_tolerances.py keeps the two tables equal.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["FORWARD_TOLERANCES", "REDUCTION_RTOL", "assert_forward_close", "assert_grad_close",
           "assert_nonfinite_agree"]

FORWARD_TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2.0**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-5),
}

REDUCTION_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2.0**-10 + 1e-4,
    torch.bfloat16: 2.0**-7 + 1e-4,
}


def assert_forward_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """An output (or an input gradient) against the reference's: same dtype and shape, within
    one rounding of the dtype."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **FORWARD_TOLERANCES[expected.dtype],
                               msg=lambda m: f"{msg}\n{m}")


def assert_grad_close(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
                      name: str, reduction: bool = False) -> None:
    """A gradient against the reference's (both None when no gradient flows). ``reduction``:
    a weight or bias gradient (a sum over the batch and the grid), with an atol that scales
    with its magnitude."""
    if expected is None:
        assert actual is None, f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: gradient missing"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if not reduction:
        assert_forward_close(actual, expected, name)
        return
    rtol = REDUCTION_RTOL[expected.dtype]
    scale = max(float(expected.detach().abs().max().float()) if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{name}\n{m}")


def assert_nonfinite_agree(actual: torch.Tensor, expected: torch.Tensor, name: str,
                           exact: bool, reduction: bool = False) -> None:
    """A result computed from inputs holding NaN/Inf against the reference's, as docs/op.md
    ("Non-finite values") promises: non-finite in the same elements (``exact``: the very same
    NaN, +Inf or -Inf), the finite elements within the tolerances above."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype and a.shape == e.shape, name
    finite = torch.isfinite(e)
    where = torch.nonzero(torch.isfinite(a) != finite)
    assert where.numel() == 0, (f"{name}: non-finite in other elements than the reference, "
                                f"first at {where[0].tolist()}: got {a[tuple(where[0])]}, "
                                f"reference {e[tuple(where[0])]}")
    if exact:
        same = (torch.isnan(a) == torch.isnan(e)) & (finite | torch.isnan(e) | (a == e))
        where = torch.nonzero(~same)
        assert where.numel() == 0, (f"{name}: another NaN/Inf than the reference at "
                                    f"{where[0].tolist()}: got {a[tuple(where[0])]}, "
                                    f"reference {e[tuple(where[0])]}")
    assert_grad_close(a[finite], e[finite], name, reduction=reduction)
