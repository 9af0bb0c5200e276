"""The chunked causal-LM loss (`unimodal.training.loss`) against the models' own loss."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from unimodal.training.loss import UnsupportedModelError, causal_lm_loss, causal_lm_loss_sums

VOCAB = 97
EXTRA = {  # per-architecture config kwargs for a tiny random model
    "llama": {}, "qwen2": {},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 30.0},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 10.0},
    "cohere": {"logit_scale": 0.25},  # logits * logit_scale
    "granite": {"logits_scaling": 4.0},  # logits / logits_scaling
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}


def build(model_type="llama", vocab=VOCAB, hidden=32, tie=False, **overrides):
    """A tiny randomly initialised causal LM (built here, independent of other unimodal modules)."""
    kwargs = dict(EXTRA[model_type])
    if model_type == "gpt2":
        kwargs.update(n_embd=hidden, n_layer=2, n_head=4, n_positions=256)
    else:
        kwargs.update(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden,
                      max_position_embeddings=256)
    kwargs.update(vocab_size=vocab, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))


def padded_batch(vocab=VOCAB):
    """Right/left padding masked out of attention and loss, a prompt without loss, a row with no
    target at all."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt: no loss on it
    labels[2] = -100  # fully masked row
    return {"input_ids": ids, "attention_mask": mask}, labels


def packed_batch(vocab=VOCAB):
    """Two packed rows, position ids restarting per document, no attention mask."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    position_ids = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    labels = ids.clone()
    labels[0, 5] = -100  # first token of the second document: nothing predicts it
    return {"input_ids": ids, "position_ids": position_ids}, labels


def own_and_chunked(model, inputs, labels, chunk_size=7, fused=True, **kw):
    """(loss, grads) of the model's own loss and of the chunked one, on the same model
    (``fused``: gradients taken in the forward; False: checkpointed chunks)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    results = []
    # use_cache=False as the collator passes (also what lets transformers see packed rows).
    inputs = {**inputs, "use_cache": False}
    for fn in (lambda: model(**inputs, labels=labels, **kw).loss,
               lambda: causal_lm_loss(model, labels=labels, chunk_size=chunk_size, fused=fused,
                                      **inputs, **kw).loss):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in params.items()}))
    return results


def assert_parity(results, tol=1e-5):
    """Loss and every trainable parameter's gradient within 1e-5, relative to the larger of 1 and
    the tensor's largest entry: the softcap test's gradients reach ~20, and summing the same terms
    in another order (chunks vs one matmul; AVX-512 vs AVX2 kernels) moves an entry of that scale
    by ~1e-5 in fp32. A wrong loss or mask is off by O(1) of that scale."""
    (ref, ref_grads), (ours, our_grads) = results
    assert torch.isfinite(ref)
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    assert ref_grads.keys() == our_grads.keys() and ref_grads
    for name, grad in ref_grads.items():
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(our_grads[name], grad, atol=tol * scale, rtol=tol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("qwen2", True), ("gemma2", False),
                                            ("gpt2", True)])
@pytest.mark.parametrize("batch", [padded_batch, packed_batch])
@pytest.mark.parametrize("fused", [True, False])
def test_parity_with_models_own_loss(model_type, tie, batch, fused):
    model = build(model_type, tie=tie)
    if model_type == "gemma2":  # logits well beyond the cap of 30, so the softcap matters
        with torch.no_grad():
            model.lm_head.weight.mul_(300)
    inputs, labels = batch()
    if model_type == "gemma2":
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
            assert model.lm_head(hidden).abs().max() > 60  # uncapped; capped ones are < 30
    assert_parity(own_and_chunked(model, inputs, labels, fused=fused))


@pytest.mark.parametrize("model_type", ["gemma3_text", "cohere", "granite"])
@pytest.mark.parametrize("fused", [True, False])
def test_parity_scaled_or_capped_logits(model_type, fused):
    model = build(model_type)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    inputs, labels = padded_batch()
    assert_parity(own_and_chunked(model, inputs, labels, fused=fused))


@pytest.mark.parametrize("fused", [True, False])
def test_independent_of_chunk_size(fused):
    model = build("llama")
    inputs, labels = padded_batch()
    (ref, ref_grads), _ = own_and_chunked(model, inputs, labels)
    for chunk_size in (1, 7, 1000, None):  # None: sized from the vocabulary
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, labels=labels, chunk_size=chunk_size, fused=fused, **inputs).loss
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=0)


def test_num_items_in_batch():
    model = build("llama")
    inputs, labels = padded_batch()
    n = torch.tensor(23)  # e.g. target tokens over all micro-batches of an accumulation step
    assert_parity(own_and_chunked(model, inputs, labels, num_items_in_batch=n))


def test_lora_with_trainable_new_rows():
    from peft import LoraConfig, get_peft_model

    new_rows = [90, 93, 96]
    model = get_peft_model(build("llama"), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
        trainable_token_indices={"embed_tokens": new_rows, "lm_head": new_rows}))
    for _name, p in model.named_parameters():  # LoRA B starts at 0: move off it so A gets grads
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.05 * torch.randn_like(p))
    head = model.get_base_model().get_output_embeddings()
    assert not isinstance(head, torch.nn.Linear)  # a PEFT wrapper: the module must be called
    inputs, labels = padded_batch()
    labels[1, -3:] = torch.tensor(new_rows)  # targets among the trainable rows
    results = own_and_chunked(model, inputs, labels)
    assert_parity(results)
    grads = results[1][1]
    assert any("trainable_tokens" in n and "lm_head" in n and g.abs().sum() > 0
               for n, g in grads.items())
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_close_to_own_loss(fused):
    model = build("llama", vocab=512)
    inputs, labels = padded_batch(512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ref, ref_grads), (ours, our_grads) = own_and_chunked(model, inputs, labels, fused=fused)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0)
    ours_flat, ref_flat = (torch.cat([g.float().flatten() for g in grads.values()])
                           for grads in (our_grads, ref_grads))
    assert torch.nn.functional.cosine_similarity(ours_flat, ref_flat, dim=0) > 0.99


def _cast_outputs_to_bf16(module, args, out):
    """What FSDP2's mixed precision does to a bf16 model's forward outputs on a GPU."""
    for key in ("logits", "loss"):
        if out.get(key) is not None:
            out[key] = out[key].to(torch.bfloat16)
    return out


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "config-only softcap"])
def test_probe_sees_through_outputs_cast_to_bf16(softcap):
    """bf16 weights and outputs (FSDP2 under bf16): the probe's logits and loss come back rounded
    to bf16, which is no transform; a softcap the forward does not apply is still caught."""
    model = build("llama", vocab=512, **({"final_logit_softcapping": softcap} if softcap else {}))
    model.to(torch.bfloat16).register_forward_hook(_cast_outputs_to_bf16)
    inputs, labels = padded_batch(512)
    if softcap:
        with pytest.raises(UnsupportedModelError, match="does not reproduce"):
            causal_lm_loss(model, labels=labels, **inputs)
        return
    ours = causal_lm_loss(model, labels=labels, **inputs).loss
    ref = model(**inputs, labels=labels).loss
    assert ref.dtype == torch.bfloat16 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.float(), rtol=2e-2, atol=0)


def test_eval_sums_per_row():
    model = build("llama").eval()
    inputs, labels = padded_batch()
    sums, counts = causal_lm_loss_sums(model, labels=labels, chunk_size=4, **inputs)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    targets = labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                            reduction="none")  # [B, T-1], 0 where ignored
    torch.testing.assert_close(sums, ref.sum(1), atol=1e-5, rtol=0)
    assert counts.tolist() == (targets != -100).sum(1).tolist() and counts[2] == 0
    assert not sums.requires_grad


def test_dropout_and_probe_leave_random_stream_alone():
    # GPT-2 with its default dropout: the same seed must give the same loss, first call included
    # (the one-time probe forks the RNG); the training flag is left as it was.
    model = build("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).train()
    inputs, labels = padded_batch()
    for _ in range(2):
        torch.manual_seed(5)
        ref = model(**inputs, labels=labels).loss
        torch.manual_seed(5)
        ours = causal_lm_loss(model, labels=labels, **inputs).loss
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert model.training and model.lm_head is model.get_output_embeddings()


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fused", [True, False])
def test_never_builds_batch_by_vocab_logits(fused):
    batch, length, vocab = 2, 128, 8192
    model = build("llama", vocab=vocab)
    ids = torch.randint(0, vocab, (batch, length))
    causal_lm_loss(model, ids, ids, chunk_size=16)  # the one-time probe, outside the measurement
    sizes = {}
    for name, fn in [("own", lambda: model(input_ids=ids, labels=ids).loss),
                     ("chunked", lambda: causal_lm_loss(model, ids, ids, chunk_size=16, fused=fused).loss)]:
        with LargestTensor() as mode:
            fn().backward()
        sizes[name] = mode.largest
    assert sizes["own"] >= batch * length * vocab
    assert sizes["chunked"] < batch * length * vocab / 4, sizes


class VocabSizedOps(TorchDispatchMode):
    """Counts the ops whose output ends in a vocabulary-sized dimension (logits and their grads)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.ops = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == self.vocab:
            self.ops.append(func.__name__)
        return out


def test_fused_head_computes_each_chunks_logits_once():
    # Checkpointed chunks compute a chunk's [n, V] logits twice (forward, recompute in backward);
    # the fused path once, and its backward builds nothing vocabulary-sized per position.
    vocab, length = 4096, 64
    model = build("llama", vocab=vocab, hidden=64)  # vocab rows (4096) != hidden (64)
    ids = torch.randint(0, vocab, (1, length))
    causal_lm_loss(model, ids, ids, chunk_size=16)  # the probe
    matmuls = {}
    for fused in (True, False):
        with VocabSizedOps(vocab) as mode:
            causal_lm_loss(model, ids, ids, chunk_size=16, fused=fused).loss.backward()
        matmuls[fused] = sum(op.startswith(("mm", "addmm")) for op in mode.ops)
    chunks = -(-(length - 1) // 16)
    assert matmuls == {True: chunks, False: 2 * chunks}, matmuls


class ShapedOutputs(TorchDispatchMode):
    """Names of the ops whose output has ``shape``."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.names = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.names.append(func.__name__)
        return out


@pytest.mark.parametrize("targets", ["some", "none"])
def test_tied_embedding_backward_builds_no_second_vocab_gradient(targets):
    # The fused head's [V, H] gradient exists from the forward; the tied embedding adds its rows
    # into it in place instead of building a second dense [V, H] (the step's peak at 160k rows).
    # The gradients equal the model's own loss (padding rows included), also with no target.
    model = build("qwen2", tie=True)
    inputs, labels = padded_batch()
    inputs["input_ids"][1, :3] = model.config.pad_token_id  # the padding row gets no gradient
    if targets == "none":
        labels = torch.full_like(labels, -100)
    kw = {"num_items_in_batch": 1}  # a finite (zero) loss without targets
    (ref_loss, ref), (loss, ours) = own_and_chunked(model, inputs, labels, **kw)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)  # a sum (/ 1), not a mean
    weight = model.get_input_embeddings().weight
    assert weight is model.lm_head.weight and model.get_input_embeddings().padding_idx == 0
    for name, grad in ref.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=0)
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, labels=labels, **inputs, **kw).loss
    with ShapedOutputs(weight.shape) as mode:
        loss.backward()
    assert set(mode.names) <= {"mul_.Tensor", "index_add_.default", "detach.default"}, mode.names
    assert "forward" not in model.get_input_embeddings().__dict__  # only during the forward


def test_refuses_a_head_that_is_not_linear():
    model = build("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    inputs, labels = padded_batch()
    with pytest.raises(UnsupportedModelError, match="loss: model"):
        causal_lm_loss(model, labels=labels, **inputs)


def test_refuses_what_the_probe_cannot_reproduce():
    # Llama's forward ignores final_logit_softcapping; the config says softcap, the forward does
    # not: the probe sees the difference.
    model = build("llama", final_logit_softcapping=5.0)
    inputs, labels = padded_batch()
    with pytest.raises(UnsupportedModelError, match="does not reproduce.*loss: model"):
        causal_lm_loss(model, labels=labels, **inputs)
    assert model.lm_head is model.get_output_embeddings()  # the head is back in place


def test_refuses_router_aux_loss():
    model = build("llama", output_router_logits=True)
    inputs, labels = padded_batch()
    with pytest.raises(UnsupportedModelError, match="auxiliary"):
        causal_lm_loss(model, labels=labels, **inputs)


@pytest.mark.parametrize("find_unused,tie", [(False, False), (True, False), (False, True)])
def test_through_ddp(find_unused, tie):
    # One gloo process: checks that the reducer sees the loss's graph through the wrapper's
    # forward (a second step raises if the first one's reduction did not finish); tied: the
    # shared weight's gradient reaches the reducer once, through the embedding (TiedGrad).
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build("qwen2" if tie else "llama", tie=tie)
        ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
        inputs, labels = padded_batch()
        for _ in range(2):
            (ref, ref_grads), _ = own_and_chunked(model, inputs, labels)
            model.zero_grad(set_to_none=True)
            loss = causal_lm_loss(ddp, labels=labels, chunk_size=7, **inputs).loss
            loss.backward()
            torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=0)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tie", [False, True])
def test_recipe_batches_match_the_models_own_loss(tiny_pipeline_factory, tie):
    """Batches as the fine-tuning recipe builds them (per-task loss masks, condition-dropped t2i
    samples, padding): `batch_loss` chunked == the model's own loss, value and gradients."""
    from unimodal.data import UnimodalCollator
    from unimodal.training import batch_loss, batch_loss_sums

    pipe = tiny_pipeline_factory(image_size=4, tie=tie)
    model, processor = pipe.model.train(), pipe.processor
    codes = torch.randint(0, 16, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    samples = []
    for i, caption in enumerate(["a cat", "the quick brown fox", "a red chair", "a dog"]):
        t2i = processor.text_to_image_ids(caption, codes[i])
        samples.append({"input_ids": t2i, "task": "t2i", "cond_len": len(processor.text_to_image_ids(caption)),
                        "index": i})
        samples.append({"input_ids": processor.image_to_text_ids(codes[i], caption), "task": "i2t",
                        "cond_len": 0, "index": 10 + i})
    collator = UnimodalCollator(processor, 64, cfg_dropout=0.5, seed=0)
    batch = collator(samples)
    dropped = [s for s in samples if s["task"] == "t2i"
               and len(collator.sample(s)[0]) < len(s["input_ids"])]
    assert dropped, "some t2i sample must lose its caption to condition dropout at this seed"

    def loss_and_grads(method):
        model.zero_grad(set_to_none=True)
        loss = batch_loss(model, dict(batch), method)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (own, own_grads), (ours, our_grads) = loss_and_grads("model"), loss_and_grads("chunked")
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=0)
    assert own_grads.keys() == our_grads.keys()
    for name in own_grads:
        torch.testing.assert_close(our_grads[name], own_grads[name], atol=1e-5, rtol=1e-5)
    # evaluation sums agree too
    (s1, c1), (s2, c2) = batch_loss_sums(model, dict(batch), "model"), batch_loss_sums(model, dict(batch), "chunked")
    torch.testing.assert_close(s2, s1, atol=1e-4, rtol=1e-5)
    assert c1.tolist() == c2.tolist()
    with pytest.raises(ValueError, match="loss must be one of"):
        batch_loss(model, dict(batch), "fused")


def test_a_refusing_model_trains_with_its_own_loss(caplog):
    """A model that says the chunked loss cannot be exact (a unified base) gets its own loss, with
    the reason logged once, also through a PEFT wrapper."""
    from peft import LoraConfig, get_peft_model

    from unimodal.training.loss import batch_loss
    from unimodal.training.loss_choice import REFUSAL_ATTRIBUTE, chunked_loss_refusal

    model = build()
    setattr(model, REFUSAL_ATTRIBUTE, "test: logits come from elsewhere")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert chunked_loss_refusal(wrapped) == "test: logits come from elsewhere"
    with caplog.at_level("WARNING", logger="unimodal.training.loss"):
        loss = batch_loss(wrapped, batch, "chunked")
        batch_loss(wrapped, batch, "chunked")
    assert torch.equal(loss, wrapped(**batch).loss)
    assert sum("logits come from elsewhere" in r.getMessage() for r in caplog.records) == 1
    assert chunked_loss_refusal(build()) is None
