"""The real LLaVA codebase (llava-torch, transformers 4.36) with SAEP: tests/llava_codebase_check.py
in a subprocess, on the packages `make llava-site` installs (tests/llava-codebase-requirements.txt),
switched by patch_llava() and by the README's edit of LLaVA's files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("SAEP_LLAVA_SITE", ROOT / "build" / "llava-site"))

pytestmark = pytest.mark.skipif(
    not (SITE / "llava").is_dir(),
    reason=f"no LLaVA environment at {SITE}: `make llava-site` installs it (`make test` does)")


def run_check(*paths: Path, args=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(p) for p in paths] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                   if p]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "llava_codebase_check.py"),
                           *args], capture_output=True, text=True, timeout=600, env=env,
                          cwd=SITE.parent)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "transformers 4.36.2" in proc.stdout
    assert "all LLaVA-codebase checks passed" in proc.stdout
    for merge in ("'flat'", "'spatial_unpad'"):
        assert f"mm_patch_merge_type={merge}" in proc.stdout
    return proc.stdout


def test_llava_codebase_runs_saep_after_patch_llava():
    assert "patch_llava()" in run_check(SITE)


def readme_edit():
    """The README's edit of LLaVA's files: {file: line to append}, and train.py's field."""
    readme = (ROOT / "README.md").read_text()
    appended = dict(re.findall(r"^# (llava/model/\S+\.py), at the end\n(from saep_kernels\S* "
                               r"import build_vision_\w+.*)$", readme, re.M))
    field = re.search(r"`(mm_vision_select_layer: Optional\[str\] = field\(default=-1\))`",
                      readme).group(1)
    return appended, field


def test_llava_codebase_runs_saep_with_the_readme_edit(tmp_path):
    appended, field = readme_edit()
    assert sorted(appended) == ["llava/model/multimodal_encoder/builder.py",
                                "llava/model/multimodal_projector/builder.py"]
    shutil.copytree(SITE / "llava", tmp_path / "llava")
    for name, line in appended.items():
        with open(tmp_path / name, "a") as f:
            f.write("\n" + line + "\n")
    train = tmp_path / "llava" / "train" / "train.py"
    stock = "mm_vision_select_layer: Optional[int] = field(default=-1)"
    assert stock in train.read_text()
    train.write_text(train.read_text().replace(stock, field))
    assert "edited builder files" in run_check(tmp_path, SITE, args=["--edited"])
