"""Generation: sampler, KV-cache decoding, batched CFG, span constraints, text and interleaved output.

Reference implementations here are deliberately naive: one row at a time, no KV cache, the full
sequence re-run every step, guidance computed from two separate forwards.
"""

import dataclasses

import pytest
import torch
from PIL import Image
from transformers import (
    ClassifierFreeGuidanceLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from unimodal.generation import (
    PRESETS,
    ImageSpanConstraint,
    KVDecoder,
    RowUniforms,
    SamplingConfig,
    TokenSampler,
    decode_image_ids,
    generate_images,
    generate_text,
    in_top_k_top_p,
    model_sampling,
    resolve_sampling,
    sample_image_tokens,
    set_sampling,
)
from unimodal.images import tensor_to_pil
from unimodal.offline import TINY_ARCHITECTURES, build_causal_lm

PROMPTS = ["a cat", "the quick brown fox jumps over the lazy dog", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def lm(tiny_pipeline_factory):
    """A tiny random Llama extended with 16 grey levels, 6x6 images in 2x2 blocks (9 image tokens)."""
    pipe = tiny_pipeline_factory(image_size=6, pixel_size=2)
    return pipe.model, pipe.processor


@pytest.fixture(scope="module")
def trained(tiny_pipeline_factory):
    """A tiny LM that learned captions, text-to-image and interleaved text+image (2x2 images).

    It puts most probability on <boi> after "the quick brown fox", so it is the model that
    would emit image ids in text mode if nothing stopped it."""
    pipe = tiny_pipeline_factory(image_size=2, hidden_size=64)
    model, processor = pipe.model, pipe.processor
    black, white = torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 15)
    captions = ["a handwritten digit zero", "a handwritten digit one"]
    seqs = []
    for caption, grid in zip(captions, (black, white)):
        seqs += [processor.text_to_image_ids(caption, grid), processor.image_to_text_ids(grid, caption)]
    seqs.append([processor.bos_token_id, *processor.encode_text("the quick brown fox"),
                 *processor.image_span_ids(black), *processor.encode_text(" jumps over"),
                 *processor.image_span_ids(white), processor.eos_token_id])
    batch = processor.tokenizer.pad({"input_ids": seqs}, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    images = tensor_to_pil(processor.image_tokenizer.decode(torch.stack([black, white])))
    return model.eval(), processor, captions, images


# ---------------------------------------------------------------------------- references

@torch.no_grad()
def reference_image_tokens(model, processor, prompt, sampling, uniforms, negative=None):
    """One row, no cache: full forwards of cond and uncond sequences, guidance by hand."""
    lo, hi = processor.image_token_range
    cond, uncond = list(prompt), list(negative or processor.unconditional_prompt_ids())
    sampler = TokenSampler(dataclasses.replace(sampling, guidance_scale=1.0))  # guidance done here
    out = []
    for t in range(processor.num_image_tokens):
        scores = model(torch.tensor([cond])).logits[:, -1, lo:hi]
        if sampling.guidance_scale != 1:
            u = model(torch.tensor([uncond])).logits[:, -1, lo:hi]
            scores = u + sampling.guidance_scale * (scores - u)
        token = int(sampler(torch.tensor([out]), scores, uniforms[t:t + 1] if sampling.do_sample else None)) + lo
        out.append(token)
        cond.append(token)
        uncond.append(token)
    return out


def prompt_rows(processor, prompts=PROMPTS):
    return [processor.text_to_image_ids(p) for p in prompts]


# ---------------------------------------------------------------------------- sampler pieces

def hf_filtered(scores, temperature, top_k, top_p):
    """transformers' warpers in generate()'s order; -inf marks what they filter out."""
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return scores


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (64, 0.5), (12, 0.9), (40, 0.97)])
def test_top_k_top_p_membership_equals_transformers_warpers(top_k, top_p):
    scores = torch.randn(8, 64, generator=torch.Generator().manual_seed(top_k)) * 2
    scores[0, :10] = float("-inf")  # forbidden ids (as the span constraint sets them)
    every_id = torch.arange(64).expand(8, 64)
    expected = hf_filtered(scores, 1.0, top_k, top_p) > float("-inf")
    assert torch.equal(in_top_k_top_p(scores, every_id, top_k, top_p), expected)


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_top_k_top_p_membership_at_liquids_settings(spread):
    # Liquid's k and p over 8192 codes: nearly flat scores (a random model) and peaked ones. Most
    # verdicts here come from the bounds on the top-k mass, the rest from the exact mass; both
    # must agree with transformers' warpers on every id, near the top-k and top-p edges too.
    scores = torch.randn(4, 8192, generator=torch.Generator().manual_seed(7)) * spread
    scores[1, 4090:4100] = scores[1, 4089]  # ties at one score
    expected = hf_filtered(scores, 1.0, 4096, 0.99) > float("-inf")  # [4, V]
    # Every 16th id by rank, and the 64 ranks either side of the kept set's edge: [4, 640]
    by_rank = scores.argsort(-1, descending=True)
    edges = expected.sum(-1, keepdim=True) + torch.arange(-64, 64)
    ranks = torch.cat([torch.arange(0, 8192, 16).expand(4, -1), edges.clamp(0, 8191)], -1)
    ids = by_rank.gather(-1, ranks)
    assert torch.equal(in_top_k_top_p(scores, ids, 4096, 0.99), expected.gather(-1, ids))


def test_token_sampler_draws_the_distribution_of_transformers_warpers():
    scores = torch.randn(1, 40, generator=torch.Generator().manual_seed(0)) * 2
    sampling = SamplingConfig(temperature=0.7, top_k=12, top_p=0.9)
    n = 40000
    picked = TokenSampler(sampling)(torch.zeros(n, 0), scores.expand(n, 40), RowUniforms(1, n, seed=0).values[0])
    freq = torch.bincount(picked, minlength=40).double() / n
    target = hf_filtered(scores, 0.7, 12, 0.9).softmax(-1)[0].double()
    assert freq[target == 0].sum() == 0  # never an id the warpers filter out
    assert torch.allclose(freq, target, atol=0.01), (freq, target)
    # Row results do not depend on the other rows.
    mixed, u = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)), RowUniforms(6, 1, seed=3).values[:, 0]
    alone = [int(TokenSampler(sampling)(torch.zeros(1, 0), mixed[i:i + 1], u[i:i + 1])) for i in range(6)]
    assert alone == TokenSampler(sampling)(torch.zeros(6, 0), mixed, u).tolist()
    greedy = TokenSampler(SamplingConfig(do_sample=False))
    assert greedy(torch.zeros(6, 0), mixed, None).tolist() == mixed.argmax(-1).tolist()


@pytest.mark.parametrize("top_k,top_p,tie", [(12, 1.0, False), (12, 1.0, True), (None, 0.3, False), (40, 0.5, False)])
def test_filtered_draws_follow_transformers_warpers(top_k, top_p, tie):
    # Flat scores over 200 ids keep little mass, so most proposals are filtered out and the rows
    # draw from the filtered distribution itself (a partial sort; ties at its edge: the warpers).
    scores = torch.randn(1, 200, generator=torch.Generator().manual_seed(2)) * 0.5
    if tie:  # the 11th to 14th best ids share one score: a tie across the top-k's edge
        scores[0, scores[0].argsort(descending=True)[10:14]] = scores[0].sort(descending=True).values[10]
    sampling = SamplingConfig(top_k=top_k, top_p=top_p)
    n = 40000
    picked = TokenSampler(sampling)(torch.zeros(n, 0), scores.expand(n, 200), RowUniforms(1, n, seed=1).values[0])
    freq = torch.bincount(picked, minlength=200).double() / n
    target = hf_filtered(scores, 1.0, top_k or 200, top_p).softmax(-1)[0].double()
    assert freq[target == 0].sum() == 0
    assert torch.allclose(freq, target, atol=0.006), (freq - target).abs().max()


def test_sampling_never_returns_a_forbidden_id_at_the_ends_of_the_unit_interval():
    scores = torch.tensor([[float("-inf"), 0.0, 0.0, float("-inf")]] * 2)
    u = torch.tensor([[0.0, 0.0], [1 - 2**-60, 0.0]], dtype=torch.float64)  # the second rounds to 1 in float32
    assert TokenSampler(SamplingConfig())(torch.zeros(2, 0), scores, u).tolist() == [1, 2]


def test_row_uniforms_give_each_row_its_own_stream():
    assert RowUniforms(3, 5, seed=7).values.shape == (3, 5, 2)
    assert torch.equal(RowUniforms(3, 5, seed=7).values[1], RowUniforms(1, 5, seed=8).values[0])
    assert torch.equal(RowUniforms(2, 4, seed=[8, 7]).values, RowUniforms(3, 4, seed=7).values[[1, 0]])
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    assert torch.equal(RowUniforms(2, 5, generator=gens).values, RowUniforms(2, 5, seed=7).values)
    single = RowUniforms(2, 5, generator=torch.Generator().manual_seed(0)).values
    assert torch.equal(single, torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    with pytest.raises(ValueError, match="not both"):
        RowUniforms(1, 1, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="one per output row"):
        RowUniforms(3, 1, seed=[1, 2])


def test_presets_overrides_and_processors():
    liquid = resolve_sampling("liquid")
    assert (liquid.guidance_scale, liquid.temperature, liquid.top_k, liquid.top_p) == (7.0, 0.9, 4096, 0.99)
    assert resolve_sampling("liquid", temperature=0.5, top_k=None).temperature == 0.5
    assert resolve_sampling(SamplingConfig(top_k=3), top_p=0.5) == SamplingConfig(top_k=3, top_p=0.5)
    assert resolve_sampling("greedy", temperature=0.7).do_sample  # a sampling knob turns sampling on
    assert not resolve_sampling("greedy", temperature=0.7, do_sample=False).do_sample
    with pytest.raises(ValueError, match="unknown sampling preset"):
        resolve_sampling("liqiud")
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplingConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match="do_sample=False"):
        SamplingConfig(temperature=0)
    kinds = [type(p) for p in TokenSampler(liquid).processors]
    assert kinds == [ClassifierFreeGuidanceLogitsProcessor, TemperatureLogitsWarper]
    assert [type(p) for p in TokenSampler(resolve_sampling("greedy", guidance_scale=2.0)).processors] == [
        ClassifierFreeGuidanceLogitsProcessor]  # no temperature when greedy


# ---------------------------------------------------------------------------- KV-cache decoding

@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_kv_decoder_matches_uncached_forward_with_left_padding(model_type):
    model = build_causal_lm(model_type, vocab_size=64).eval()
    rows = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 12]]
    steps = torch.tensor([[20, 21, 22], [23, 24, 25], [26, 27, 28]])  # [B, 3] fed one column at a time
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 6 - len(r):], mask[i, 6 - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        full, sliced = KVDecoder(model), KVDecoder(model, vocab_slice=(30, 50))
        got_full, got_sliced = [full.prefill(ids, mask)], [sliced.prefill(ids, mask)]
        for t in range(3):
            got_full.append(full.step(steps[:, t]))
            got_sliced.append(sliced.step(steps[:, t]))
        for i, r in enumerate(rows):
            ref = model(torch.tensor([r + steps[i].tolist()])).logits[0, len(r) - 1:]  # [4, V]
            assert torch.allclose(torch.stack([g[i] for g in got_full]), ref, atol=1e-5)
            assert torch.allclose(torch.stack([g[i] for g in got_sliced]), ref[:, 30:50], atol=1e-5)
    assert model.get_output_embeddings().weight.shape[0] == 64  # head restored after slicing


def test_kv_decoder_slices_after_the_fact_when_the_head_is_wrapped():
    from peft import LoraConfig, get_peft_model

    model = build_causal_lm("llama", vocab_size=64)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    model = lora.base_model.model.eval()  # the LM with LoRA layers injected, head no longer nn.Linear
    ids, mask = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        got = KVDecoder(model, vocab_slice=(10, 20)).prefill(ids, mask)
        assert torch.allclose(got, model(ids).logits[:, -1, 10:20], atol=1e-5)


def test_kv_decoder_rejects_right_padding(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="left-padded"):
        KVDecoder(model).prefill(torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]))


def test_batched_cfg_logits_equal_two_unbatched_forwards(lm):
    """One forward over [cond rows; uncond rows] on one cache == separate forwards, per step."""
    model, processor = lm
    lo, hi = processor.image_token_range
    cond = prompt_rows(processor)
    uncond = processor.unconditional_prompt_ids()
    batch = processor.pad(cond + [uncond] * 3, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [6, L]
    cfg = ClassifierFreeGuidanceLogitsProcessor(4.0)
    tokens = torch.randint(lo, hi, (3, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoder = KVDecoder(model, vocab_slice=(lo, hi))
        guided = [cfg(tokens[:, :0], decoder.prefill(ids, mask))]
        for t in range(3):
            guided.append(cfg(tokens[:, :0], decoder.step(tokens[:, t].repeat(2))))
        for i in range(3):
            c = model(torch.tensor([cond[i] + tokens[i, :3].tolist()])).logits[0, -4:, lo:hi]
            u = model(torch.tensor([uncond + tokens[i, :3].tolist()])).logits[0, -4:, lo:hi]
            assert torch.allclose(torch.stack([g[i] for g in guided]), u + 4.0 * (c - u), atol=1e-4)


# ---------------------------------------------------------------------------- text-to-image

@pytest.mark.parametrize("sampling", [
    SamplingConfig(guidance_scale=3.0, temperature=0.9, top_k=8, top_p=0.9),
    SamplingConfig(guidance_scale=7.0, do_sample=False),
])
def test_sample_image_tokens_matches_unbatched_uncached_reference(lm, sampling):
    model, processor = lm
    rows = prompt_rows(processor)
    got = sample_image_tokens(model, processor, rows, sampling, seed=11, progress=False)
    u = RowUniforms(3, processor.num_image_tokens, seed=11).values
    for i, row in enumerate(rows):
        assert got[i].tolist() == reference_image_tokens(model, processor, row, sampling, u[i])


def test_guidance_one_is_plain_sampling_without_the_unconditional_rows(lm):
    model, processor = lm
    rows = prompt_rows(processor)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        got = sample_image_tokens(model, processor, rows, SamplingConfig(guidance_scale=1.0), seed=3, progress=False)
    finally:
        hook.remove()
    assert set(seen) == {3}  # B rows per forward, not 2B
    u = RowUniforms(3, processor.num_image_tokens, seed=3).values
    for i, row in enumerate(rows):
        assert got[i].tolist() == reference_image_tokens(model, processor, row, SamplingConfig(), u[i])


def test_a_row_does_not_depend_on_its_batch(lm):
    model, processor = lm
    sampling = resolve_sampling("liquid", top_k=8)
    rows = [r for r in prompt_rows(processor) for _ in range(2)]  # 2 images per prompt
    together = sample_image_tokens(model, processor, rows, sampling, seed=100, progress=False)
    chunked = sample_image_tokens(model, processor, rows, sampling, seed=100, batch_size=4, progress=False)
    assert torch.equal(together, chunked)
    for i in (0, 3, 5):
        alone = sample_image_tokens(model, processor, rows[i:i + 1], sampling, seed=100 + i, progress=False)
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_generated_spans_are_well_formed_over_many_seeds(lm, batch):
    model, processor = lm
    lo, hi = processor.image_token_range
    prompts = (PROMPTS * 3)[:batch]
    for seed in range(6):
        ids = sample_image_tokens(model, processor, prompt_rows(processor, prompts), resolve_sampling("liquid"),
                                  seed=seed * 1000, progress=False)
        assert ids.shape == (batch, processor.num_image_tokens)
        assert ((ids >= lo) & (ids < hi)).all()
        for row, prompt in zip(ids, prompts):
            full = [*processor.text_to_image_ids(prompt), *row.tolist(), processor.eoi_token_id]
            segments = processor.decode(full, strict=True)
            assert isinstance(segments[-1], Image.Image) and segments[-1].size == (6, 6)


def test_generate_images_api(lm):
    model, processor = lm
    images = generate_images(model, processor, PROMPTS[:2], num_images_per_prompt=2, seed=5, top_k=8, progress=False)
    assert len(images) == 4 and all(im.size == (6, 6) and im.mode == "RGB" for im in images)
    again = generate_images(model, processor, PROMPTS[1], seed=7, top_k=8, progress=False)
    assert again[0].tobytes() == images[2].tobytes()  # image 2 = prompt 1 with seed 5 + 2
    greedy = dict(seed=7, top_k=8, do_sample=False, progress=False)
    negative = generate_images(model, processor, PROMPTS[1], negative_prompt="a cat", **greedy)
    # The negative caption is the unconditional branch: the reference guides away from it.
    expected = reference_image_tokens(model, processor, processor.text_to_image_ids(PROMPTS[1]),
                                      resolve_sampling("liquid", top_k=8, do_sample=False), None,
                                      negative=processor.text_to_image_ids("a cat"))
    assert [im.tobytes() for im in negative] == [decode_image_ids(processor, torch.tensor([expected]))[0].tobytes()]
    assert negative[0].tobytes() != generate_images(model, processor, PROMPTS[1], **greedy)[0].tobytes()
    with pytest.raises(ValueError, match="must end with <boi>"):
        sample_image_tokens(model, processor, [[processor.bos_token_id]], SamplingConfig(), progress=False)


def test_decode_image_ids_names_the_bad_position(lm):
    model, processor = lm
    lo, _ = processor.image_token_range
    ids = torch.full((2, processor.num_image_tokens), lo)
    assert len(decode_image_ids(processor, ids)) == 2
    ids[1, 3] = 5  # a text id inside the span
    with pytest.raises(ValueError, match="position"):
        decode_image_ids(processor, ids)


def test_trained_model_draws_the_captioned_image(trained):
    model, processor, captions, images = trained
    out = generate_images(model, processor, captions, num_images_per_prompt=2, preset="liquid",
                          guidance_scale=3.0, temperature=0.5, seed=0, progress=False)
    assert [im.getpixel((0, 0)) for im in out] == [(0, 0, 0)] * 2 + [(255, 255, 255)] * 2


# ---------------------------------------------------------------------------- text and interleaved

def test_captioning_and_text_continuation(trained):
    model, processor, captions, images = trained
    assert generate_text(model, processor, ["", ""], images=images, max_new_tokens=12) == captions
    one = generate_text(model, processor, "", images=images[1], max_new_tokens=12)
    assert one == captions[1]
    with_placeholder = generate_text(model, processor, "<image>", images=[images[0]], max_new_tokens=12)
    assert with_placeholder == captions[0]
    with pytest.raises(ValueError, match="one image per text"):
        generate_text(model, processor, ["", ""], images=images[:1])


def test_generate_text_never_emits_image_ids(trained):
    model, processor, _, _ = trained
    prompt = "the quick brown fox"  # the model's next token here is <boi>
    ids = processor(prompt, return_tensors="pt")
    unconstrained = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert unconstrained[0, -3].item() == processor.boi_token_id  # so the test below can fail
    constrained = model.generate(**ids, max_new_tokens=12, do_sample=False,
                                 logits_processor=[ImageSpanConstraint.from_processor(processor)])
    new = constrained[0, ids["input_ids"].shape[1]:]
    assert not processor.vocab.is_image(new).any() and processor.boi_token_id not in new.tolist()
    # generate_text decodes strictly: a stray image id or <eoi> would raise
    out = generate_text(model, processor, [prompt] * 8, max_new_tokens=12, temperature=1.5, seed=0)
    assert all(isinstance(s, str) for s in out) and len(set(out)) > 1


def test_constraint_masks_per_row_state(lm):
    _, processor = lm
    lo, hi = processor.image_token_range
    boi, eoi, n = processor.boi_token_id, processor.eoi_token_id, processor.num_image_tokens
    vocab = 448  # the embedding rows: padded past the last image id
    constraint = ImageSpanConstraint.from_processor(processor, allow_images=True, max_length=40)
    text_row = [processor.bos_token_id, 5, 6] + [7] * n
    open_row = [processor.bos_token_id, 5, boi] + [lo] * (n - 1)
    full_row = [processor.bos_token_id, 5, boi, *[lo] * n]
    ids = processor.pad([text_row, open_row, full_row], padding_side="left")["input_ids"]  # pads: text
    allowed = constraint(ids, torch.zeros(3, vocab)) > float("-inf")
    assert allowed[0, 5] and allowed[0, processor.eos_token_id] and allowed[0, boi]
    assert not allowed[0, lo:hi].any() and not allowed[0, eoi] and not allowed[0, hi:].any()
    assert not allowed[0, processor.pad_token_id]
    assert allowed[1].nonzero().flatten().tolist() == list(range(lo, hi))  # inside a span: image ids only
    assert allowed[2].nonzero().flatten().tolist() == [eoi]  # span full: <eoi> only
    no_room = ImageSpanConstraint.from_processor(processor, allow_images=True, max_length=len(text_row) + n + 1)
    assert not (no_room(torch.tensor([text_row]), torch.zeros(1, vocab)) > float("-inf"))[0, boi]


def test_interleaved_output_alternates_text_and_images(trained):
    model, processor, _, images = trained
    out = generate_text(model, processor, ["the quick brown fox"] * 3, max_new_tokens=20, allow_images=True,
                        preset="plain", temperature=0.3, seed=1)
    for segments in out:
        kinds = [isinstance(s, Image.Image) for s in segments]
        assert kinds[:3] == [True, False, True], segments
        assert all(a != b for a, b in zip(kinds, kinds[1:]))  # never two of a kind in a row
        assert segments[1] == " jumps over" and segments[0].size == (2, 2)
    # No room for a whole span before max_new_tokens: <boi> is not opened at all.
    short = generate_text(model, processor, "the quick brown fox", max_new_tokens=4, allow_images=True)
    assert all(isinstance(s, str) for s in short)


def _spans(processor, ids):
    """``(opened, closed)`` per image span in ``ids``: a span is closed when exactly
    ``num_image_tokens`` image ids follow its <boi>, then <eoi>."""
    n, ids = processor.num_image_tokens, ids.tolist()
    return [(s, ids[s + 1 + n:s + 2 + n] == [processor.eoi_token_id]
             and bool(processor.vocab.is_image(torch.tensor(ids[s + 1:s + 1 + n])).all()))
            for s, t in enumerate(ids) if t == processor.boi_token_id]


def test_constraint_in_transformers_generate_closes_spans(trained):
    """Spans the model opens itself (rows 0-3) and spans opened by the prompt (rows 4-7) are
    filled with exactly h*w image ids and closed, at a temperature that breaks them unconstrained."""
    model, processor, _, _ = trained
    prompt = processor.text_to_image_ids("the quick brown fox")  # [bos, text..., <boi>]
    batch = processor.pad([prompt[:-1]] * 4 + [prompt] * 4, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    start = ids.shape[1] - 1  # the prompt's last position: a <boi> there opens a span too
    constraint = ImageSpanConstraint.from_processor(processor, allow_images=True, max_length=ids.shape[1] + 16)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=2.0,
                         logits_processor=[constraint])
    for row in out:
        spans = _spans(processor, row[start:])
        assert spans and all(closed for _, closed in spans), (row.tolist(), spans)
        processor.decode(row, strict=True)  # raises on any malformed span
    # The same sampling without the constraint leaves spans unfilled or unclosed: the checks above can fail.
    torch.manual_seed(0)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=2.0)
    assert not all(closed for row in free for _, closed in _spans(processor, row[start:]))


# ---------------------------------------------------------------------------- the model's own settings

def test_generation_defaults_to_the_models_settings_else_the_presets(tiny_pipeline_factory):
    pipe = tiny_pipeline_factory(image_size=6, pixel_size=2)  # its own: set_sampling changes the model
    model, processor = pipe.model, pipe.processor
    assert model_sampling(model) == (PRESETS["liquid"], "preset liquid")  # nothing stored yet
    assert model_sampling(model, "text") == (PRESETS["greedy"], "preset greedy")

    def images(**kwargs):
        return [im.tobytes() for im in generate_images(model, processor, PROMPTS, 2, seed=3, progress=False, **kwargs)]

    liquid = images(preset="liquid")
    assert images() == liquid  # no settings: the Liquid preset, image for image

    own = SamplingConfig(guidance_scale=1.5, temperature=2.0, top_k=3)  # far enough from Liquid's to show
    set_sampling(model, own)
    assert model.generation_config.unimodal_image == dataclasses.asdict(own)
    assert model_sampling(model) == (own, "model")
    assert images() == images(preset=own) != liquid  # its settings, not Liquid's
    # Explicit arguments still override the model's settings field by field.
    assert images(guidance_scale=7.0) == images(preset=dataclasses.replace(own, guidance_scale=7.0))

    text_kwargs = dict(max_new_tokens=6, seed=1)
    greedy = generate_text(model, processor, PROMPTS, **text_kwargs)
    set_sampling(model, "plain", task="text")
    assert model_sampling(model, "text") == (PRESETS["plain"], "model")
    assert generate_text(model, processor, PROMPTS, **text_kwargs) == \
        generate_text(model, processor, PROMPTS, preset="plain", **text_kwargs)
    set_sampling(model, None, task="text")  # removed: back to greedy
    assert generate_text(model, processor, PROMPTS, **text_kwargs) == greedy


def test_unusable_stored_settings_say_how_to_fix_them(tiny_pipeline_factory):
    model = tiny_pipeline_factory(image_size=2).model
    model.generation_config.unimodal_image = {"guidance_scale": 0.5}
    with pytest.raises(ValueError, match="generation_config.json has unusable unimodal_image.*set_sampling"):
        model_sampling(model)
    model.generation_config.unimodal_image = {"guidance": 3.0}  # not a SamplingConfig field
    with pytest.raises(ValueError, match="unusable unimodal_image"):
        model_sampling(model)
    with pytest.raises(ValueError, match="task must be one of"):
        model_sampling(model, "video")
