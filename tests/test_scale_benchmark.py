"""benchmarks/scale.py end to end at its --quick shapes: every variant of the default plan runs in
its own process and lands in the one table with its figures (no timing asserts)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale.py"


def scale(*args: str, timeout: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quick_run_has_every_row_of_the_default_plan(tmp_path):
    plan = [line.split()[1] for line in scale("--list", "--quick", timeout=120).splitlines() if line.startswith("*")]
    assert {"vq-b1", "act", "lm-full-gc-i2t-ours", "lm-full-gc-i2t-model", "lm-full-gc-i2t-trl",
            "lm-inbwd-gc-t2i-ours", "lm-inbwd-gc-t2i-model", "gen", "dist-zero3"} <= set(plan)
    out = tmp_path / "table.md"
    log = scale("--quick", "--threads", "1", "--root", str(tmp_path / "runs"), "--out", str(out), timeout=1800)
    table = out.read_text()
    assert table.split("\n\n", 1)[1] in log  # the same table printed and written, after its header
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in plan:
            rows.setdefault(cells[0], []).append(cells)
    assert sorted(rows) == sorted(plan)
    for name, (first, *_) in rows.items():
        variant, _, system, peak, speed, ratio = first
        assert re.fullmatch(r"[\d., ]+ GB", peak), f"{name}: {peak}"  # measured, not "failed" / "did not fit"
        assert speed != "-", name
        if name.startswith("lm-") and name.endswith("-ours"):
            assert "of model loss" in ratio, name  # ours / the model's loss, in the same run
        if name == "lm-full-gc-i2t-ours":
            assert "of TRL" in ratio
        if name == "gen":
            # ours, transformers' generate, ours compiled (its warm-up apart; not the eager fallback)
            assert "of generate" in ratio and len(rows[name]) == 3
            compiled = rows[name][2]
            assert "compiled step" in compiled[2] and "warm-up" in compiled[5] and compiled[4] != "-"
        if name == "dist-zero3":
            assert len(peak.split(",")) == 2 and "of 1 process" in ratio  # one peak per process
