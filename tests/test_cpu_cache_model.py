"""The cache model of the CPU max forward's loads (scripts/cpu_cache_model.py): its L1 hit
rate reaches the no-conflict bound where a group's pixels spread over the L1 sets, and falls
below it where the pixel stride is a power of two, except in the bf16 group walk (each line
loaded once a step for both vector blocks)."""

import pytest

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import cpu_cache_model  # noqa: E402


def test_spread_sets_reach_the_bound_and_power_of_two_strides_do_not():
    # llava15-7b's grid, one task: C = 1056 puts a group's pixels 33 lines apart (every set),
    # C = 1024 32 lines (bf16: two sets of 12 ways) or 64 (fp32: one set)
    for elem_bytes in (2, 4):
        spread = cpu_cache_model.max_forward_loads(24, 24, 1056, 1, elem_bytes, tasks=1,
                                                   walk="blocks")
        assert spread["L1"] == spread["bound"] > 0
        aliased = cpu_cache_model.max_forward_loads(24, 24, 1024, 1, elem_bytes, tasks=1,
                                                    walk="blocks")
        assert aliased["L1"] < 0.6 * aliased["bound"]
        for n in (spread, aliased):
            assert n["L1"] + n["L2"] + n["mem"] == n["loads"]


def test_the_bf16_group_walk_reaches_the_bound_at_a_power_of_two_stride():
    # one window a step, both blocks from one load: each line is loaded once per step, and the
    # 8 patch lines a step shares with the next fit the two sets' 24 ways
    group = cpu_cache_model.max_forward_loads(24, 24, 1024, 1, 2, tasks=1)
    assert group["L1"] == group["bound"] > 0
    blocks = cpu_cache_model.max_forward_loads(24, 24, 1024, 1, 2, tasks=1, walk="blocks")
    # 16 loads a window for both blocks against 24 for two windows of one block (2/3 inside;
    # the edge windows load their in-grid pixels)
    assert 0.6 * blocks["loads"] < group["loads"] < 0.65 * blocks["loads"]
    assert group["L2"] + group["mem"] < 0.55 * (blocks["L2"] + blocks["mem"])
    with pytest.raises(ValueError, match="walk"):
        cpu_cache_model.max_forward_loads(24, 24, 1024, 1, 2, walk="rows")


def test_cli_prints_every_config_and_dtype(capsys):
    assert cpu_cache_model.main(["--configs", "llava15-7b"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in out[1:]] == [["llava15-7b", "1024", "bf16", "group"],
                                                      ["llava15-7b", "1024", "fp32", "blocks"]]
