"""The cache model of the CPU max forward's loads (scripts/cpu_cache_model.py): its L1 hit
rate reaches the no-conflict bound where a group's pixels spread over the L1 sets, and falls
below it where the pixel stride is a power of two."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import cpu_cache_model  # noqa: E402


def test_spread_sets_reach_the_bound_and_power_of_two_strides_do_not():
    # llava15-7b's grid, one task: C = 1056 puts a group's pixels 33 lines apart (every set),
    # C = 1024 32 lines (bf16: two sets of 12 ways) or 64 (fp32: one set)
    for elem_bytes in (2, 4):
        spread = cpu_cache_model.max_forward_loads(24, 24, 1056, 1, elem_bytes, tasks=1)
        assert spread["L1"] == spread["bound"] > 0
        aliased = cpu_cache_model.max_forward_loads(24, 24, 1024, 1, elem_bytes, tasks=1)
        assert aliased["L1"] < 0.6 * aliased["bound"]
        for n in (spread, aliased):
            assert n["L1"] + n["L2"] + n["mem"] == n["loads"]


def test_cli_prints_every_config_and_dtype(capsys):
    assert cpu_cache_model.main(["--configs", "llava15-7b"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in out[1:]] == [["llava15-7b", "1024", "bf16"],
                                                      ["llava15-7b", "1024", "fp32"]]
