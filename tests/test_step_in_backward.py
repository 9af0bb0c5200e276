"""The optimizer step inside backward (`unimodal.training.step_in_backward`; the finetune recipe's
``optimizer_in_backward``): the same weights as a step after backward, one parameter's gradient
alive at a time instead of all of them, exact resume in the recipe, refusals that say what to set."""

import subprocess

import pytest
import torch
from launching import REPO, command, env, kill_tree, run, wait_for, weights

from unimodal.errors import UserError
from unimodal.offline import build_causal_lm, train_text_tokenizer
from unimodal.training import adamw, batch_loss, check_step_in_backward, step_in_backward

STEPS = "9"  # 1 process, batch 4: ~0.1 s a step


def train(model, batches, in_backward: bool) -> tuple[torch.optim.Optimizer, list[int]]:
    """AdamW on ``model`` over ``batches``; returns the optimizer and, per ``step()`` call, the number
    of parameters that held a gradient when it ran (an optimizer step pre-hook)."""
    optimizer = adamw(model.parameters(), lr=1e-2, weight_decay=0.1)
    holding: list[int] = []
    optimizer.register_step_pre_hook(
        lambda opt, *_: holding.append(sum(p.grad is not None for g in opt.param_groups for p in g["params"])))
    if in_backward:
        step_in_backward(optimizer)
    for ids in batches:
        batch_loss(model, {"input_ids": ids, "labels": ids}, "chunked").backward()
        optimizer.step()  # a no-op when every parameter was stepped in backward
        optimizer.zero_grad()
    return optimizer, holding


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_same_weights_as_a_step_after_backward_with_one_gradient_alive(tied):
    torch.manual_seed(0)
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(3)]
    models = [build_causal_lm("llama", vocab_size=64, tie_word_embeddings=tied, seed=1) for _ in range(2)]
    after, holding_after = train(models[0], batches, in_backward=False)
    inside, holding_inside = train(models[1], batches, in_backward=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), name  # the fused kernel updates each tensor independently
    count = len(list(models[1].parameters()))
    # After backward every gradient exists at once; inside it exactly one (the tied matrix's once,
    # after both of its uses), and the caller's own step() finds none.
    assert holding_after == [count] * 3
    assert holding_inside == ([1] * count + [0]) * 3
    assert all(p.grad is None for p in models[1].parameters())
    assert {s["step"].item() for s in inside.state.values()} == {3.0}
    assert inside.state_dict()["state"].keys() == after.state_dict()["state"].keys()


def test_refusals_say_what_to_set():
    check_step_in_backward(1, "NO", 0.0, 1)  # one process, no clipping, no accumulation: fine
    with pytest.raises(UserError, match="set max_grad_norm: 0"):
        check_step_in_backward(1, "NO", 1.0, 1)
    with pytest.raises(UserError, match="set gradient_accumulation_steps: 1"):
        check_step_in_backward(1, "NO", 0.0, 4)
    with pytest.raises(UserError, match="launch one process, or use ZeRO-2/3"):
        check_step_in_backward(2, "MULTI_CPU", 0.0, 1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, finetune_data_factory):
    root = tmp_path_factory.mktemp("in_backward")
    finetune_data_factory(root, train_text_tokenizer(), num_digits=60)
    return root


def one_process(data_root, out, *extra: str) -> list[str]:
    return command(None, data_root, out, "--max_steps", STEPS, "--eval_steps", "0", "--max_grad_norm", "0", *extra)


@pytest.fixture(scope="module")
def plain(data_root) -> dict[str, torch.Tensor]:
    """The recipe's weights with the step after backward (no clipping): the reference."""
    run(one_process(data_root, data_root / "plain"))
    return weights(data_root / "plain")


def assert_same_weights(out, reference: dict[str, torch.Tensor]) -> None:
    got = weights(out)
    assert got.keys() == reference.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name


def test_recipe_gives_the_weights_of_the_plain_step(data_root, plain):
    run(one_process(data_root, data_root / "inside", "--optimizer_in_backward", "true"))
    assert_same_weights(data_root / "inside", plain)


@pytest.mark.slow
def test_recipe_resumes_exactly_after_sigkill(data_root, plain):
    # SIGKILL after the step-3 checkpoint, relaunch: the optimizer state the hooks stepped is in it.
    out = data_root / "killed"
    proc = subprocess.Popen(one_process(data_root, out, "--optimizer_in_backward", "true"), env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(out / "checkpoints" / "step-00000003", proc)
    kill_tree(proc.pid)
    resumed = run(one_process(data_root, out, "--optimizer_in_backward", "true"))
    assert "resuming at step" in resumed.stdout + resumed.stderr
    assert_same_weights(out, plain)


def test_recipe_refuses_clipping_with_the_setting_to_change(data_root):
    cmd = command(None, data_root, data_root / "clipped", "--max_steps", "2", "--optimizer_in_backward", "true")
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "set max_grad_norm: 0 (it is 0.5)" in proc.stderr, proc.stderr[-2000:]
