"""benchmarks/tokenizer.py and benchmarks/tokenizer_lm.py end to end at tiny sizes: every quantizer
family lands in the table with its figures, the long run retrains the best two, the LM side gives
one row per vocabulary size (no timing asserts)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, timeout: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(log: str, columns: int) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in log.splitlines() if line.startswith("| ")]
    return [r for r in rows if len(r) == columns and r[0][0].isdigit()]


@pytest.mark.slow
def test_tokenizer_benchmark_compares_every_family_and_reruns_the_best_two():
    log = bench("tokenizer.py", "--steps", "2", "--sizes", "1024", "--variants", "ours", "fsq", "lfq", "simvq", "vqp",
                "vqp-fsq", "--speed_steps", "1", "--speed_rounds", "1", "--eval_samples", "16", "--jobs", "1",
                "--long_steps", "2", timeout=1500)
    rows = table_rows(log, 8)
    assert len(rows) == 6 + 2  # the comparison, then the best two again
    names = [r[1] for r in rows[:6]]
    assert any(n.startswith("ours: FSQ [8, 5, 5, 5]") for n in names) and any("LFQ 10 bits" in n for n in names)
    assert sum(n.startswith("vector_quantize_pytorch") for n in names) == 2
    for k, _, quality, ssim, usage, perplexity, steps, encode in rows:
        assert k in ("1000", "1024") and math.isfinite(float(quality.split()[0])) and -1 <= float(ssim) <= 1
        used, ceiling = (float(x.strip("()%")) for x in usage.split())  # "19.3% (63.2%)"
        assert 0 < used <= 100 and 0 < ceiling <= 100 and float(perplexity) >= 1
        assert float(steps.split()[0]) > 0 and float(encode.split()[0]) > 0
    assert "K=1024: best new quantizer" in log


@pytest.mark.slow
def test_lm_side_benchmark_has_one_row_per_vocabulary_size(tmp_path):
    log = bench("tokenizer_lm.py", "--quick", "--codes", "1024", "4096", "--steps", "2", "--root", str(tmp_path),
                timeout=900)
    rows = table_rows(log, 5)
    assert [r[0] for r in rows] == ["1024", "4096"] and int(rows[1][1]) - int(rows[0][1]) == 3072
    assert all(float(r[3].split()[0]) > 0 and float(r[4].split()[0]) > 0 for r in rows)
