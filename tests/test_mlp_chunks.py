"""Checkpointed MLPs with their backward in token chunks (`unimodal.training.mlp_chunks`): the same
loss and gradients as the plain layers, no [N, intermediate] tensor in backward, no extra forward."""

import copy

import pytest
import torch
from test_loss import LargestTensor, build, padded_batch
from torch.utils._python_dispatch import TorchDispatchMode

from unimodal.training.mlp_chunks import chunk_mlps

CHUNK = 7  # tokens: the 3 x 10 batch is 5 chunks, the last one short


def checkpointed(model):
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def loss_and_grads(model, inputs, labels, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def plain_and_chunked(model_type, **kw):
    plain = checkpointed(build(model_type, **kw))
    chunked = copy.deepcopy(plain)
    assert chunk_mlps(chunked, CHUNK) == 2  # both layers' MLPs
    return plain, chunked


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("qwen2", True), ("gemma2", False), ("gpt2", True)])
def test_same_loss_and_gradients_as_the_plain_layers(model_type, tie):
    plain, chunked = plain_and_chunked(model_type, tie=tie)
    inputs, labels = padded_batch()
    want_loss, want = loss_and_grads(plain, inputs, labels)
    got_loss, got = loss_and_grads(chunked, inputs, labels)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-6)
    assert_same_grads(got, want)


class MatmulDtypes(TorchDispatchMode):
    """The input dtypes of every matrix product run while the mode is on."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_the_backward_recomputes_in_bf16_too():
    plain, chunked = plain_and_chunked("llama")
    inputs, labels = padded_batch()
    want_loss, want = loss_and_grads(plain, inputs, labels, autocast=True)
    chunked.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_loss = chunked(**inputs, labels=labels, use_cache=False).loss
    with MatmulDtypes() as seen:
        got_loss.backward()
    assert seen.dtypes == {torch.bfloat16}  # the chunks' recomputed products too, as in the forward
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-6)
    for name, p in chunked.named_parameters():  # per-chunk weight gradients rounded to bf16, then summed
        assert (p.grad - want[name]).norm() <= 1e-2 * want[name].norm(), name


def test_lora_on_the_mlp_trains_the_same_adapters():
    from peft import LoraConfig, get_peft_model

    plain, chunked = plain_and_chunked("qwen2")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
                      init_lora_weights=False)  # random B: the adapters' gradients are not zero
    plain, chunked = get_peft_model(plain, lora), get_peft_model(chunked, copy.deepcopy(lora))
    chunked.load_state_dict(plain.state_dict())
    inputs, labels = padded_batch()
    _, want = loss_and_grads(plain, inputs, labels)
    _, got = loss_and_grads(chunked, inputs, labels)
    assert any("mlp.down_proj.lora_A" in name for name in want)
    assert_same_grads(got, want)


@pytest.mark.parametrize("chunks", [False, True], ids=["plain: [N, I] in backward", "chunked: [chunk, I]"])
def test_backward_never_builds_an_intermediate_for_all_tokens(chunks):
    # intermediate 256 x 30 tokens: the plain MLP's [30, 256] (7,680) beats every weight (64 x 256)
    model = checkpointed(build("llama", hidden=16, intermediate_size=256, vocab=23))
    if chunks:
        chunk_mlps(model, CHUNK)
    inputs, labels = padded_batch(vocab=23)
    loss = model(**inputs, labels=labels, use_cache=False).loss
    with LargestTensor() as seen:
        loss.backward()
    tokens = inputs["input_ids"].numel()
    if chunks:
        assert seen.largest <= max(CHUNK * 256, 16 * 256), seen.largest
    else:
        assert seen.largest >= tokens * 256, "the plain backward should build [N, I]: the test shape is wrong"


def count_mlp_calls(model):
    """Calls of each MLP's first projection (forward hooks), in a list that the caller reads."""
    calls = [0]
    for name, module in model.named_modules():
        if name.endswith("mlp.gate_proj"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("model_type,recomputed", [("llama", 0), ("gemma2", 1)])
def test_backward_runs_each_mlp_once_per_chunk(model_type, recomputed):
    # Llama: checkpoint's recomputation stops at the saved MLP input, so backward runs the MLP once
    # per chunk. Gemma2's post-feed-forward norm saves the MLP's output: recomputed once more.
    _, chunked = plain_and_chunked(model_type)
    calls = count_mlp_calls(chunked)
    inputs, labels = padded_batch()
    loss = chunked(**inputs, labels=labels, use_cache=False).loss
    assert calls[0] == 2 * 5  # the forward: 2 layers x 5 chunks, no gradients kept
    calls[0] = 0
    loss.backward()
    assert calls[0] == 2 * 5 * (1 + recomputed)


def test_left_as_is_without_gradients_or_with_one_chunk_of_tokens():
    _, chunked = plain_and_chunked("llama")
    calls = count_mlp_calls(chunked)
    inputs, labels = padded_batch()
    with torch.no_grad():
        chunked(**inputs, use_cache=False)
    assert calls[0] == 2  # one call per layer: not chunked
    one_chunk = chunked(input_ids=inputs["input_ids"][:1, :CHUNK], use_cache=False).logits
    assert "_ChunkedMLPBackward" not in node_names(one_chunk)
    assert "_ChunkedMLPBackward" in node_names(chunked(**inputs, use_cache=False).logits)  # 5 chunks


def node_names(tensor):
    """The class names of every node in ``tensor``'s autograd graph."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_an_active_dropout_keeps_the_plain_layer():
    # A chunk recomputed in backward would draw other dropout masks than its forward did.
    plain, chunked = plain_and_chunked("gpt2", resid_pdrop=0.1)
    inputs, labels = padded_batch()
    torch.manual_seed(3)
    want_loss, want = loss_and_grads(plain, inputs, labels)
    torch.manual_seed(3)
    got_loss, got = loss_and_grads(chunked, inputs, labels)
    assert torch.equal(got_loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_chunk_size_below_one_is_refused():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunk_mlps(build("llama"), 0)
