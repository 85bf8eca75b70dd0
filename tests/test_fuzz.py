"""Seeded fuzzing: every fused backend against the reference over random shapes, options,
dtypes, layouts of every tensor argument (hidden states, weight, bias, grad_out) and edge
values (NaN, +Inf, -Inf in the hidden states; the empty batch), forward and gradients.

Each case is drawn from its own seed, ``SEED + i``; a failure names it. Replay one case:

    SAEP_FUZZ_SEED=<seed> SAEP_FUZZ_CASES=1 python -m pytest tests/test_fuzz.py -k <target>

A target runs cases until it has run ``CASES[target]`` of them or spent ``BUDGET_S[target]``
seconds (the interpreted Triton path costs about a second a case), and reports its count.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass

import pytest
import torch

from conftest import target_params
from helpers import GRAD_LAYOUTS, PARAM_LAYOUTS, check_forward_and_grads, make_layers, make_params

SEED = int(os.environ.get("SAEP_FUZZ_SEED", "20261124"))
CASES = {"triton-cpu": 40, "triton-cuda": 300}
DEFAULT_CASES = 2000
BUDGET_S = {"triton-cpu": 60}
DEFAULT_BUDGET_S = 60
ONLY_CASES = os.environ.get("SAEP_FUZZ_CASES")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPECIAL_VALUES = (float("nan"), float("inf"), float("-inf"))


@dataclass
class Case:
    seed: int
    batch: int
    height: int
    width: int
    channels: int
    layers: int
    ksize: int
    prefix: int
    pool: str
    residual: bool
    bias: bool
    dtype: str
    param_dtype: str
    layout: str
    param_layout: str
    grad_layout: str
    specials: int  # NaN/Inf values put into the hidden states

    @classmethod
    def draw(cls, seed: int) -> "Case":
        r = random.Random(seed)
        dtype = r.choice(DTYPES)
        return cls(
            seed=seed,
            batch=r.choice([0, 1, 1, 2, 3]),
            height=r.randint(1, 9),
            width=r.randint(1, 9),
            channels=r.choice([1, 2, 3, 5, 8, 16, 24, 33]),
            layers=r.randint(1, 4),
            ksize=r.choice([1, 3, 5, 7]),
            prefix=r.choice([0, 0, 1, 2]),
            pool=r.choice(["avg", "max"]),
            residual=r.random() < 0.7,
            bias=r.random() < 0.7,
            dtype=str(dtype).split(".")[-1],
            param_dtype=str(torch.float32 if r.random() < 0.2 else dtype).split(".")[-1],
            layout=r.choice(["contiguous", "slice", "transposed"]),
            param_layout=r.choice(PARAM_LAYOUTS),
            grad_layout=r.choice(GRAD_LAYOUTS),
            specials=r.choice([0, 0, 0, 1, 3]),
        )

    def run(self, backend: str, device: str) -> None:
        torch.manual_seed(self.seed)
        dtype, param_dtype = getattr(torch, self.dtype), getattr(torch, self.param_dtype)
        layers = make_layers(self.batch, self.height, self.width, self.channels, self.layers,
                             prefix=self.prefix, dtype=dtype, device=device, layout=self.layout)
        r = random.Random(self.seed)
        for _ in range(self.specials if self.batch else 0):
            layer = layers[r.randrange(self.layers)]
            token = self.prefix + r.randrange(self.height * self.width)
            layer[r.randrange(self.batch), token, r.randrange(self.channels)] = \
                r.choice(SPECIAL_VALUES)
        layers = [t.detach().requires_grad_() for t in layers]
        w, b = make_params(self.layers, self.channels, self.ksize, dtype=param_dtype,
                           device=device, bias=self.bias, requires_grad=True,
                           layout=self.param_layout)
        kw = dict(grid=(self.height, self.width), num_prefix_tokens=self.prefix,
                  residual=self.residual, pool=self.pool)
        check_forward_and_grads(backend, layers, w, b, kw, str(asdict(self)),
                                grad_layout=self.grad_layout, nonfinite=self.specials > 0)


@pytest.mark.parametrize("target", target_params())
def test_fuzz_against_reference(target):
    backend, device = target
    key = f"{backend}-{device}"
    cases = int(ONLY_CASES) if ONLY_CASES else CASES.get(key, DEFAULT_CASES)
    budget = BUDGET_S.get(key, DEFAULT_BUDGET_S)
    start = time.monotonic()
    ran = 0
    for i in range(cases):
        case = Case.draw(SEED + i)
        try:
            case.run(backend, device)
        except Exception as exc:
            raise AssertionError(
                f"fuzz case seed={case.seed} failed on {key}: {case}\nreplay: "
                f"SAEP_FUZZ_SEED={case.seed} SAEP_FUZZ_CASES=1 python -m pytest "
                f"tests/test_fuzz.py -k {key}") from exc
        ran += 1
        if time.monotonic() - start > budget:
            break
    print(f"fuzz {key}: {ran} cases in {time.monotonic() - start:.1f} s (seeds {SEED}.."
          f"{SEED + ran - 1})")
    assert ran >= min(cases, 10), f"only {ran} cases within {budget} s"
