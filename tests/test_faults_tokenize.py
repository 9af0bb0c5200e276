"""Preemption of the other two recipes (issue #18), with real signals: the tokenizer recipe stops
after the step in progress with a checkpoint and resumes bit-identical; pre-tokenisation stops
before its next batch, keeps the parts it finished and a relaunch encodes only the rest."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from digits import load_digits_dataset  # examples/digits/digits.py, on pytest's pythonpath
from launching import REPO, env, wait_for

from unimodal.data import load_pretokenized, read_metadata
from unimodal.training import PREEMPTED_EXIT_CODE, Preempted
from unimodal.vq.model import VQGAN

TINY = REPO / "recipes" / "configs" / "train_tokenizer_tiny.yaml"


def signal_when(path: Path, sig: signal.Signals, timeout: float = 120) -> threading.Thread:
    """Send ``sig`` to this process once ``path`` exists (from a thread; Python runs the handler
    in the main thread, between two bytecodes of whatever the recipe is doing)."""
    def watch():
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_tokenizer_recipe_preempted_by_sigusr1_resumes_bit_identical(tmp_path, capsys):
    from unimodal.recipes import train_tokenizer

    args = ["--config", str(TINY), "--report_to", "none", "--max_steps", "10", "--save_steps", "3",
            "--eval_steps", "0", "--sample_steps", "100"]
    train_tokenizer.main([*args, "--output_dir", str(tmp_path / "full")])
    out = tmp_path / "preempted"
    watcher = signal_when(out / "checkpoints" / "step-00000003", signal.SIGUSR1)
    with pytest.raises(Preempted) as stopped:
        train_tokenizer.main([*args, "--output_dir", str(out)])
    watcher.join()
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert "preempted (SIGUSR1) at step" in stopped.value.message and not (out / "final").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the recipe put the handler back
    train_tokenizer.main([*args, "--output_dir", str(out)])
    assert "resuming at step" in capsys.readouterr().out
    a, b = VQGAN.from_pretrained(tmp_path / "full" / "final"), VQGAN.from_pretrained(out / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_pipeline_factory):
    """160 captioned 8 px digits (save_to_disk) and a saved processor; parts of 20 rows."""
    root = tmp_path_factory.mktemp("pretokenize_faults")
    load_digits_dataset(image_size=8, split="train").select(range(160)).save_to_disk(str(root / "digits"))
    tiny_pipeline_factory(image_size=8).processor.save_pretrained(root / "processor")
    config = {"source": str(root / "digits"), "processor": str(root / "processor"), "tasks": ["t2i", "i2t"],
              "keep_columns": ["label"], "batch_size": 2, "part_rows": 20}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def tokenize(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "recipes" / "tokenize_dataset.py"), "--config", str(source / "config.yaml"),
            "--output_dir", str(out), "--cache_dir", str(out.parent / f"{out.name}-cache"), *extra]


@pytest.mark.slow  # 3 pre-tokenisations (2 launched): ~50 s on a busy 2-core machine
def test_pretokenize_preempted_keeps_finished_parts_and_resumes_to_the_same_data(source):
    from unimodal.recipes import tokenize_dataset

    full = source / "full"  # in this process, in one part
    tokenize_dataset.main(tokenize(source, full, "--part_rows", "4096")[2:])
    out = source / "preempted"
    parts = source / ".preempted-parts"
    proc = subprocess.Popen(tokenize(source, out), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(parts / "rows-0000000000-0000000020", proc, poll=0.002)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    kept = sorted(p.name for p in parts.glob("rows-*"))
    assert 1 <= len(kept) < 8 and "finished part(s)" in log and not out.exists()
    assert not list(parts.glob(".tmp-*"))  # the part in progress was dropped, not half-written
    resumed = subprocess.run(tokenize(source, out), env=env(), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(kept)} finished part(s) in {parts} are kept from an earlier run" in resumed.stdout
    assert not parts.exists()
    one, two = load_pretokenized(full), load_pretokenized(out)
    assert one.column_names == two.column_names
    for name in one.column_names:  # identical to the uninterrupted run, row for row
        assert one[name] == two[name], name
    assert read_metadata(out)["stats"] == read_metadata(full)["stats"]


def test_parts_of_other_inputs_are_refused(source, tmp_path):
    from unimodal.data import PretokenizeOptions, load_source
    from unimodal.data.pretokenize import pretokenize_parts
    from unimodal.processor import UnimodalProcessor

    parts = tmp_path / ".other-parts"
    parts.mkdir()
    (parts / "parts.json").write_text('{"fingerprint": "another data set", "num_rows": 5}')
    with pytest.raises(ValueError, match=f"{parts} holds parts of an unfinished pre-tokenisation of other data"):
        pretokenize_parts(load_source(source / "digits"), UnimodalProcessor.from_pretrained(source / "processor"),
                          PretokenizeOptions(), parts, 0, 160, 20)
    assert sorted(p.name for p in parts.iterdir()) == ["parts.json"]  # nothing mixed in
