"""Faults of multi-process launches (issue #18), for real (2 gloo processes on CPU): SIGTERM to
`accelerate launch` (torch elastic forwards it to the workers), SIGUSR1 under DeepSpeed ZeRO-2, and
a checkpoint resumed on another process count: DDP continues the same run when the global batch is
kept (2 -> 1 and 1 -> 2), DeepSpeed ZeRO-2/3 refuses before training with what to do."""

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
from launching import REPO, command, env, run, wait_for, weights

from unimodal.offline import train_text_tokenizer

pytestmark = pytest.mark.slow  # 2-process launches: ~10-30 s each
STEPS = "12"
# What a 2 -> 1 or 1 -> 2 resume may differ by: the same samples and steps, gradients averaged by
# DDP's all-reduce instead of summed by accumulation (float rounding only; measured max 0.0 here).
TOLERANCE = 1e-6


def launch(config: str | None, data_root: Path, out: Path, *extra: str, processes: int = 2) -> list[str]:
    """The recipe on ``processes`` processes under accelerate launch config ``config`` (None: one
    plain process, ``python recipes/finetune.py``)."""
    cmd = command(config, data_root, out, "--max_steps", STEPS, "--eval_steps", "0", *extra)
    if config is not None:
        at = cmd.index("--config_file")
        cmd[at:at] = ["--num_processes", str(processes)]
    return cmd


def preempt(cmd: list[str], out: Path, sig: signal.Signals = signal.SIGTERM, **extra_env: str) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` to its first process once checkpoint step 3 exists; returns the
    step it stopped at and the log."""
    proc = subprocess.Popen(cmd, env={**env(), **extra_env}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(out / "checkpoints" / "step-00000003", proc)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, log[-3000:]
    assert f"preempted ({sig.name}) at step" in log, log[-3000:]
    assert not (out / "final").exists()
    latest = sorted((out / "checkpoints").iterdir())[-1]
    return json.loads((latest / "state.json").read_text())["step"], log


def assert_same(out: Path, reference: dict, atol: float = 0.0) -> float:
    got = weights(out)
    assert got.keys() == reference.keys()
    worst = max(float((got[k] - reference[k]).abs().max()) for k in reference)
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, finetune_data_factory):
    root = tmp_path_factory.mktemp("faults_launch")
    finetune_data_factory(root, train_text_tokenizer(), num_digits=60)  # 104 rows: 26 batches of 4
    return root


@pytest.fixture(scope="module")
def ddp_reference(data_root):
    out = data_root / "ddp"
    run(launch("ddp_cpu.yaml", data_root, out))
    return weights(out)


@pytest.fixture(scope="module")
def single_reference(data_root):
    """One process accumulating 2 batches per step: the same global batch as 2 DDP processes."""
    out = data_root / "single"
    run(launch(None, data_root, out, "--gradient_accumulation_steps", "2"))
    return out


def test_sigterm_to_accelerate_launch_checkpoints_on_every_worker_and_resumes_bit_identical(data_root, ddp_reference):
    out = data_root / "ddp-sigterm"
    step, log = preempt(launch("ddp_cpu.yaml", data_root, out), out)
    # The launcher (torch elastic) forwarded SIGTERM; the workers stopped at the same step, wrote
    # the checkpoint together and exited with 75.
    assert log.count("received SIGTERM") == 2 and "Exiting with code 75" in log
    resumed = run(launch("ddp_cpu.yaml", data_root, out))
    assert f"resuming at step {step}" in resumed.stdout + resumed.stderr
    assert_same(out, ddp_reference)


def test_sigusr1_under_zero2_with_the_launcher_forwarding_it(data_root):
    """SLURM's pre-timeout signal: torch elastic forwards SIGUSR1 only when told to."""
    reference = data_root / "zero2"
    run(launch("zero2.yaml", data_root, reference))
    out = data_root / "zero2-sigusr1"
    step, _ = preempt(launch("zero2.yaml", data_root, out), out, signal.SIGUSR1,
                      PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    resumed = run(launch("zero2.yaml", data_root, out))
    assert f"resuming at step {step}" in resumed.stdout + resumed.stderr
    assert_same(out, weights(reference))


def test_ddp_checkpoint_of_2_processes_resumes_on_1_with_the_global_batch_kept(data_root, ddp_reference):
    out = data_root / "2to1"
    step, _ = preempt(launch("ddp_cpu.yaml", data_root, out), out)
    refused = subprocess.run(launch(None, data_root, out), env=env(), cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2
    assert re.search(r"was written by 2 process\(es\) under ddp with a global batch of 2 x 4 x 1 .* this launch "
                     r"has 1 x 4 x 1\. To continue the same run keep per_device_batch_size and set "
                     r"--gradient_accumulation_steps 2", refused.stderr), refused.stderr[-2000:]
    resumed = run(launch(None, data_root, out, "--gradient_accumulation_steps", "2"))
    assert f"resuming at step {step}" in resumed.stdout + resumed.stderr
    print(f"2 -> 1 processes: max weight difference {assert_same(out, ddp_reference, TOLERANCE):.3g}")


def test_ddp_checkpoint_of_1_process_resumes_on_2(data_root, single_reference):
    out = data_root / "1to2"
    step, _ = preempt(launch(None, data_root, out, "--gradient_accumulation_steps", "2"), out)
    resumed = run(launch("ddp_cpu.yaml", data_root, out))
    assert f"resuming at step {step}" in resumed.stdout + resumed.stderr
    print(f"1 -> 2 processes: max weight difference {assert_same(out, weights(single_reference), TOLERANCE):.3g}")


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_checkpoint_on_another_process_count_is_refused_before_training(data_root, single_reference,
                                                                                  zero):
    out = data_root / f"{zero}-short"
    run(launch(f"{zero}.yaml", data_root, out, "--max_steps", "4"))  # leaves checkpoint step 3
    refused = subprocess.run(launch(None, data_root, out, "--max_steps", "4"), env=env(), cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert (f"was written by 2 process(es) under deepspeed-{zero}; this launch is 1 process(es) under ddp"
            in refused.stderr)
    assert "relaunch with `accelerate launch --num_processes 2` and the same launch config" in refused.stderr
    assert "fine-tuning:" not in refused.stderr  # before any training step
    # 1 -> 2: a one-process checkpoint relaunched under ZeRO on 2 processes
    refused = subprocess.run(launch(f"{zero}.yaml", data_root, single_reference, "--gradient_accumulation_steps",
                                    "2"), env=env(), cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0
    assert f"was written by 1 process(es) under ddp; this launch is 2 process(es) under deepspeed-{zero}" \
        in refused.stderr + refused.stdout
