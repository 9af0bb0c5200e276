"""Faults a fine-tune survives (issue #18), for real, in one process (`python recipes/finetune.py`):
SIGTERM / SIGUSR1 preemption, SIGKILL from outside at named points inside a checkpoint save, a full
disk (a size-limited tmpfs), corrupt or foreign checkpoints. Every relaunch must end with the
weights of an uninterrupted run, bit for bit. Multi-process variants and changed process counts:
tests/test_faults_launch.py."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from launching import REPO, command, env, kill_tree, run, wait_for, weights

from unimodal.offline import train_text_tokenizer
from unimodal.training import PREEMPTED_EXIT_CODE

STEPS = "12"  # 1 process, batch 4: ~0.1 s a step; checkpoints every 3 steps


def one_process(data_root: Path, out: Path, *extra: str) -> list[str]:
    return command(None, data_root, out, "--max_steps", STEPS, "--eval_steps", "0", *extra)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, finetune_data_factory):
    root = tmp_path_factory.mktemp("faults")
    finetune_data_factory(root, train_text_tokenizer(), num_digits=60)
    return root


@pytest.fixture(scope="module")
def reference(data_root):
    """The uninterrupted run every interrupted one must match."""
    out = data_root / "reference"
    run(one_process(data_root, out))
    return weights(out)


def assert_same_weights(out: Path, reference: dict) -> None:
    got = weights(out)
    assert got.keys() == reference.keys()
    for name in reference:
        assert torch.equal(got[name], reference[name]), name


def error_message(stderr: str) -> str:
    """The ``<prog>: error: ...`` line a recipe prints for a `UserError` (exit status 2)."""
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert lines, stderr[-3000:]
    return lines[-1]


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ---------------------------------------------------------------------------- 1. preemption
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_exits_75_and_resumes_bit_identical(data_root, reference, sig):
    out = data_root / f"preempted-{sig.name}"
    proc = subprocess.Popen(one_process(data_root, out), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(out / "checkpoints" / "step-00000003", proc)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    assert f"received {sig.name}" in log and "relaunch the same command to resume" in log
    stopped = json.loads((out / "checkpoints" / checkpoint_names(out)[-1] / "state.json").read_text())["step"]
    assert 3 <= stopped < int(STEPS) and f"preempted ({sig.name}) at step {stopped}: wrote" in log
    assert not (out / "final").exists()
    resumed = run(one_process(data_root, out, "--log_steps", "2"))  # a setting a relaunch may change
    assert f"resuming at step {stopped}" in resumed.stdout + resumed.stderr
    assert_same_weights(out, reference)


# ---------------------------------------------------------------------------- 2. kill during a save
@pytest.mark.parametrize("point", [pytest.param("saved-state", marks=pytest.mark.slow), "before-rename",
                                   pytest.param("after-rename", marks=pytest.mark.slow)])
def test_sigkill_inside_a_save_then_relaunch_resumes_from_the_last_complete_one(data_root, reference, point):
    """The process stops at ``point`` of the step-6 save (the test hook waits there after writing a
    marker file) and is SIGKILLed from outside; step-3 is the last complete checkpoint unless the
    rename was done."""
    out = data_root / f"killed-{point}"
    marker = data_root / f"marker-{point}"
    proc = subprocess.Popen(one_process(data_root, out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**env(), "UNIMODAL_TEST_PAUSE_AT": f"{point}:6",
                                 "UNIMODAL_TEST_PAUSE_MARKER": str(marker)})
    wait_for(marker, proc)
    kill_tree(proc.pid)
    left = checkpoint_names(out)
    if point == "after-rename":
        assert left == ["step-00000003", "step-00000006"]  # renamed, pruning not reached
    else:
        assert left == [".tmp-step-00000006", "step-00000003"]
    resumed = run(one_process(data_root, out))
    log = resumed.stdout + resumed.stderr
    assert f"resuming at step {3 if point != 'after-rename' else 6}" in log
    if point != "after-rename":
        assert "removed the partial checkpoint(s) ['.tmp-step-00000006']" in log
    assert not any(name.startswith(".") for name in checkpoint_names(out))
    assert_same_weights(out, reference)


@pytest.mark.slow
def test_sigkill_timed_on_the_first_file_of_a_save(data_root, reference):
    """A kill from outside as soon as accelerate's first file of the step-6 save appears, with no
    hook: wherever it lands (mid-file, between files), the relaunch ends bit-identical."""
    out = data_root / "killed-between-files"
    proc = subprocess.Popen(one_process(data_root, out), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(out / "checkpoints" / ".tmp-step-00000006" / "model.safetensors", proc, poll=0.001)
    kill_tree(proc.pid)
    run(one_process(data_root, out))
    assert_same_weights(out, reference)


# ---------------------------------------------------------------------------- 3. full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real size-limited filesystem (tmpfs; needs root and a kernel that lets us mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: str) -> Path:
        opts = f"size={size}" if not os.path.ismount(mount) else f"remount,size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a size-limited tmpfs here: {proc.stderr.decode().strip()}")
        return mount

    yield resize
    if os.path.ismount(mount):
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_stops_with_a_message_and_keeps_the_last_good_checkpoint(data_root, reference, small_disk):
    size = sum(p.stat().st_size for p in (data_root / "reference" / "checkpoints").iterdir()
               for p in p.rglob("*") if p.is_file()) // 2  # one checkpoint (keep_last=2 kept two)
    disk = small_disk(f"{int(size * 1.6) // 1024}k")  # room for one checkpoint, not two
    out = disk / "run"
    proc = subprocess.run(one_process(data_root, out, "--keep_last", "1"), env=env(), cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = error_message(proc.stderr)
    assert f"no space left on the disk of {out / 'checkpoints'} writing checkpoint step-00000006" in message
    assert "it needs about" in message and "are free" in message
    assert "The last good checkpoint" in message and "step-00000003 is intact" in message
    # keep_last=1 did not delete step 3 for a step 6 that could not be written; nothing partial left
    assert checkpoint_names(out) == ["step-00000003"]
    small_disk("64m")  # the user frees space: the same command resumes and ends bit-identical
    resumed = run(one_process(data_root, out, "--keep_last", "1"))
    assert "resuming at step 3" in resumed.stdout + resumed.stderr
    assert_same_weights(out, reference)


def test_disk_full_during_the_first_write_removes_the_partial_folder(tmp_path, small_disk):
    """ENOSPC raised by the filesystem inside accelerate's save_state (no earlier checkpoint to size
    a pre-check with)."""
    from unimodal.training import CheckpointManager, CheckpointSpaceError, make_accelerator

    disk = small_disk("256k")
    acc = make_accelerator(project_dir=tmp_path, log_with=None)
    model = acc.prepare(torch.nn.Linear(256, 512))  # 513 KB of weights
    checkpoints = CheckpointManager(disk / "checkpoints")
    with pytest.raises(CheckpointSpaceError, match=r"writing checkpoint step-00000001: it needs more than .* "
                       r"written.*No checkpoint was written yet") as caught:
        checkpoints.save(acc, 1)
    assert "No space left on device" in str(caught.value.__cause__)  # what the filesystem said
    assert list((disk / "checkpoints").iterdir()) == []
    assert model is not None


# ---------------------------------------------------------------------------- 5. corrupt / foreign
@pytest.fixture(scope="module")
def finished(data_root, reference):
    """A finished run's output folder (checkpoints step-6 and step-9) to damage copies of."""
    return data_root / "reference"


def damaged_copy(finished: Path, tmp_path: Path, damage) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "final")
    damage(out / "checkpoints" / "step-00000009")
    return out


def truncate(name: str):
    def damage(checkpoint: Path) -> None:
        file = checkpoint / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return damage


TRUNCATED = r"model\.safetensors is \d+ bytes but was saved with \d+ \(truncated\?\)"


def test_truncated_checkpoint_is_refused_by_the_recipe_naming_the_file(finished, tmp_path):
    out = damaged_copy(finished, tmp_path, truncate("model.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = subprocess.run(one_process(finished.parent, out), env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = error_message(proc.stderr)
    assert str(out / "checkpoints" / "step-00000009") in message
    assert re.search(TRUNCATED, message), message
    assert "Delete" in message  # what to do
    # never a fresh start over the user's run: nothing written, nothing deleted
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not (out / "final").exists()


@pytest.mark.parametrize("damage,expected", [
    (truncate("model.safetensors"), TRUNCATED),
    (truncate("optimizer.bin"), r"optimizer\.bin is \d+ bytes but was saved with"),
    (lambda c: (c / "state.json").unlink(), r"state\.json is missing"),
    (lambda c: (c / "state.json").write_text('{"step": 9, "fi'), r"state\.json is damaged"),
    (lambda c: (c / "optimizer.bin").unlink(), r"optimizer\.bin is missing"),
    (lambda c: (c / "random_states_0.pkl").unlink(), r"random_states_0\.pkl is missing"),
], ids=["truncated safetensors", "truncated optimizer", "missing state.json", "cut state.json",
        "missing optimizer state", "missing RNG state"])
def test_damaged_checkpoint_is_refused_naming_the_file(finished, tmp_path, damage, expected):
    """What the recipe's `CheckpointManager.load` checks first, on copies of a real run's checkpoint."""
    from unimodal.training import CheckpointError, CheckpointManager, make_accelerator

    out = damaged_copy(finished, tmp_path, damage)
    checkpoints = CheckpointManager(out / "checkpoints")
    with pytest.raises(CheckpointError, match=expected) as caught:
        checkpoints.load(make_accelerator(project_dir=tmp_path, log_with=None))
    assert str(out / "checkpoints" / "step-00000009") in str(caught.value)


def test_checkpoint_of_another_config_is_refused_in_process(finished, tmp_path):
    from unimodal.training import CheckpointError, CheckpointManager, make_accelerator

    saved = json.loads((finished / "checkpoints" / "step-00000009" / "state.json").read_text())["config"]
    accelerator = make_accelerator(project_dir=tmp_path, log_with=None)
    checkpoints = CheckpointManager(finished / "checkpoints", config={**saved, "max_length": 128, "max_steps": 99})
    with pytest.raises(CheckpointError, match=r"another config \(max_length: 160 -> 128\)"):
        checkpoints.check(finished / "checkpoints" / "step-00000009", accelerator)
    CheckpointManager(finished / "checkpoints", config={**saved, "max_steps": 99, "eval_steps": 2}).check(
        finished / "checkpoints" / "step-00000009", accelerator)  # settings a relaunch may change
    # mlp_chunk_size changes memory only, and a config from before it existed lacks it
    before_mlp_chunks = {k: v for k, v in saved.items() if k != "mlp_chunk_size"}
    for config in ({**saved, "mlp_chunk_size": 64}, before_mlp_chunks):
        CheckpointManager(finished / "checkpoints", config=config).check(
            finished / "checkpoints" / "step-00000009", accelerator)


@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused(finished, tmp_path):
    out = damaged_copy(finished, tmp_path, lambda c: None)
    proc = subprocess.run(one_process(finished.parent, out, "--learning_rate", "1e-3", "--lora_r", "4"),
                          env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = error_message(proc.stderr)
    assert f"checkpoint {out / 'checkpoints' / 'step-00000009'} was written by a run with another config" in message
    assert "learning_rate: 0.003 -> 0.001" in message and "lora_r: 16 -> 4" in message
    assert not (out / "final").exists()
    # A setting a relaunch may change (a longer run, another log cadence) resumes.
    resumed = run(one_process(finished.parent, out, "--log_steps", "2", "--keep_last", "3"))
    assert "resuming at step 9" in resumed.stdout + resumed.stderr
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_partial_checkpoint_only_is_a_fresh_start(data_root, tmp_path, reference):
    """A run killed inside its first save left only ``.tmp-step-N``: nothing complete to resume,
    so the relaunch starts from step 0 (and says it removed the partial folder)."""
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-00000003").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-00000003" / "model.safetensors").write_bytes(b"half")
    proc = run(one_process(data_root, out))
    assert "removed the partial checkpoint(s) ['.tmp-step-00000003']" in proc.stdout + proc.stderr
    assert_same_weights(out, reference)


# ---------------------------------------------------------------------------- 4. process count
def test_process_count_rule_on_a_real_checkpoint(finished, tmp_path):
    """The rule `CheckpointManager.load` applies before training, on a real checkpoint whose
    state says it was written by 2 DDP processes (or ZeRO-2), loaded by this one process. The
    launches themselves: tests/test_faults_launch.py."""
    from unimodal.training import CheckpointError, CheckpointManager, continued_micro_step, make_accelerator

    def written_by(world: dict) -> Path:
        out = damaged_copy(finished, tmp_path / world["strategy"], lambda c: None)
        state_file = out / "checkpoints" / "step-00000009" / "state.json"
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world": world}))
        return out / "checkpoints" / "step-00000009"

    accelerator = make_accelerator(project_dir=tmp_path, log_with=None)
    ddp = written_by({"num_processes": 2, "strategy": "ddp"})
    config = json.loads((ddp / "state.json").read_text())["config"]
    with pytest.raises(CheckpointError, match=r"global batch of 2 x 4 x 1 .* set --gradient_accumulation_steps 2"):
        CheckpointManager(ddp.parent, config=config).check(ddp, accelerator)
    state = CheckpointManager(ddp.parent, config={**config, "gradient_accumulation_steps": 2}).check(ddp, accelerator)
    assert continued_micro_step(state, accelerator) == 2 * state["micro_step"]  # the same samples read
    with pytest.raises(CheckpointError, match=r"per_device_batch_size"):
        CheckpointManager(ddp.parent, config={**config, "per_device_batch_size": 8}).check(ddp, accelerator)
    zero = written_by({"num_processes": 2, "strategy": "deepspeed-zero2"})
    with pytest.raises(CheckpointError, match=r"under deepspeed-zero2; this launch is 1 process\(es\) under ddp.*"
                                              r"accelerate launch --num_processes 2"):
        CheckpointManager(zero.parent, config=config).check(zero, accelerator)
