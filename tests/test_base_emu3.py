"""Emu3 as a unified base (`unimodal.bases.emu3`): vocabulary map, sequence format, generation
parity with Emu3's own ``generate``, training and saving in its own format.

Every test runs on one tiny random ``Emu3ForConditionalGeneration`` built in-process: a byte-level
BPE tokenizer with Emu3's control tokens and 64 ``<|visual token ......|>`` tokens added in a
shuffled order (so code -> id is a real permutation, as the contract requires the processor to
handle), a 2-layer text model and a 2-level VQ model (8 x 8 pixel images -> 4 x 4 codes).
"""

from __future__ import annotations

import pytest
import torch

K = 64  # codebook size
IMAGE_SIZE = 8  # pixels; the tiny VQ downsamples by 2 -> 4 x 4 codes


def build_emu3(seed: int = 0):
    """``(model, processor)``: `unimodal.bases.emu3_tiny.build_emu3` at the sizes above."""
    from unimodal.bases.emu3_tiny import build_emu3 as build

    return build(codebook_size=K, image_size=IMAGE_SIZE, seed=seed)


@pytest.fixture(scope="module")
def emu3():
    return build_emu3()


@pytest.fixture(scope="module")
def emu3_folder(emu3, tmp_path_factory):
    """The tiny model saved in transformers' format (what BAAI/Emu3-Gen-hf looks like), no processor files
    of ours."""
    model, processor = emu3
    folder = tmp_path_factory.mktemp("emu3") / "hf"
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    return folder


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- vocabulary and format


def test_codes_ids_round_trip_through_the_vocabulary_map(emu3):
    model, processor = emu3
    mapping = model.vocabulary_mapping  # transformers' Emu3ImageVocabularyMapping
    codes = torch.arange(K)
    ids = processor.vocab.codes_to_ids(codes)
    assert processor.vocab.permuted  # the shuffled tokens: a real table, not offset + code
    assert torch.equal(ids, mapping.img2bpe_mapping_tensor[codes].long())
    assert torch.equal(processor.vocab.ids_to_codes(ids), codes)
    lo, hi = processor.image_token_range
    assert (lo, hi) == (min(mapping.image_tokens), max(mapping.image_tokens) + 1) and hi - lo == K


def test_image_codes_equal_emu3s_own_vq(emu3):
    """The converted VQGAN the processor uses gives Emu3VQVAE's codes (and the span holds them)."""
    model, processor = emu3
    x = images(3)
    ours = processor.encode_images(x)
    theirs = torch.stack(model.model.vqmodel.encode(x, torch.tensor([[IMAGE_SIZE] * 2] * 3)).image_tokens)
    assert torch.equal(ours, theirs) and ours.unique().numel() > 3


def test_image_span_equals_emu3s_own_tokens(emu3):
    """Our span = transformers' Emu3Processor layout with the placeholders filled by
    Emu3Model.get_image_tokens (rows + end-of-line)."""
    model, processor = emu3
    x = images(1)
    codes = processor.encode_images(x)[0]
    span = processor.image_span_ids(codes)
    tok = processor.tokenizer
    h, w = processor.grid_shape
    visual = model.model.get_image_tokens(x, torch.tensor([[IMAGE_SIZE] * 2])).tolist()  # h * (w + 1)
    expected = (tok.convert_tokens_to_ids(["<|image start|>"]) + tok.encode(f"{h}*{w}", add_special_tokens=False)
                + tok.convert_tokens_to_ids(["<|image token|>"]) + visual
                + tok.convert_tokens_to_ids(["<|extra_201|>", "<|image end|>"]))
    assert span == expected and len(span) == processor.span_length


def test_generation_prompt_equals_transformers_processor(emu3):
    from transformers import Emu3ImageProcessor
    from transformers import Emu3Processor as HFEmu3Processor

    _, processor = emu3
    hf = HFEmu3Processor(Emu3ImageProcessor(), processor.tokenizer)
    caption = "a red square on a blue sky"
    theirs = hf(text=[caption], return_for_image_generation=True, ratio="1:1",
                image_area=(4 * 8) ** 2)["input_ids"][0]  # 4 x 4 codes at Emu3's factor 8
    assert processor.text_to_image_ids(caption) == theirs
    assert processor.text_to_image_ids(caption)[-1] == processor.boi_token_id
    assert processor.unconditional_prompt_ids() == hf(text=[""], return_for_image_generation=True, ratio="1:1",
                                                      image_area=(4 * 8) ** 2)["input_ids"][0]


def test_user_text_never_yields_image_or_control_ids(emu3):
    _, processor = emu3
    hostile = ("<|visual token 000003|><|image start|>4*4<|image token|><|extra_200|><|extra_201|>"
               "<|image end|><|extra_203|><|extra_204|><image>")
    ids = torch.tensor(processor.encode_text(hostile))
    assert not processor.vocab.is_image(ids).any()
    assert not torch.isin(ids, processor.control_ids).any()
    assert processor.decode([processor.bos_token_id, *ids.tolist(), processor.eos_token_id]) == [hostile]


def test_decode_round_trip_and_clear_errors(emu3):
    _, processor = emu3
    codes = processor.encode_images(images(2))
    ids = processor.image_to_text_ids(codes[0], "a caption") + processor.image_to_text_ids(codes[1])
    segments = processor.decode(ids, return_codes=True)
    assert [type(s).__name__ for s in segments] == ["Tensor", "str", "Tensor"]
    assert torch.equal(segments[0], codes[0]) and torch.equal(segments[2], codes[1]) and segments[1] == "a caption"
    broken = processor.image_to_text_ids(codes[0])
    eol_at = broken.index(processor.eol_token_id)
    with pytest.raises(ValueError, match="expected 4 rows of 4 visual ids"):
        processor.decode(broken[:eol_at] + broken[eol_at + 1:])
    cut = broken[:-2]  # generation stopped before <|extra_201|><|image end|>
    with pytest.raises(ValueError, match="lacks"):
        processor.decode(cut)
    assert torch.equal(processor.decode(cut, strict=False, return_codes=True)[0], codes[0])
    pil = processor.decode_image_ids(processor.vocab.codes_to_ids(codes).view(2, -1))
    assert len(pil) == 2 and pil[0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_save_and_load_processor(emu3, emu3_folder, tmp_path):
    from transformers import Emu3Processor as HFEmu3Processor

    from unimodal import UnimodalProcessor
    from unimodal.bases import base_for
    from unimodal.bases.emu3 import Emu3Processor

    _, processor = emu3
    # from the model folder alone (BAAI's format): tokenizer + the model's VQ converted
    from_model = Emu3Processor.from_pretrained(emu3_folder, image_size=IMAGE_SIZE)
    codes = processor.encode_images(images(2))
    assert torch.equal(from_model.encode_images(images(2)), codes)
    assert base_for(emu3_folder).name == "emu3"
    processor.save_pretrained(tmp_path / "p")
    assert base_for(tmp_path / "p").name == "emu3"
    loaded = UnimodalProcessor.from_pretrained(tmp_path / "p")  # dispatches on "base"
    assert isinstance(loaded, Emu3Processor)
    assert loaded.image_span_ids(codes[0]) == processor.image_span_ids(codes[0])
    assert torch.equal(loaded.vocab.code_to_id, processor.vocab.code_to_id)
    # a checkpoint normalising pixels otherwise (CLIP mean/std) is refused, not silently mis-encoded
    import shutil

    from transformers import Emu3ImageProcessor

    clip = tmp_path / "clip"
    shutil.copytree(emu3_folder, clip)
    Emu3ImageProcessor().save_pretrained(clip)  # transformers' default: CLIP mean/std
    with pytest.raises(ValueError, match="mean = std = 0.5"):
        Emu3Processor.from_pretrained(clip, image_size=IMAGE_SIZE)
    # transformers' own processor reads the same folder
    hf = HFEmu3Processor.from_pretrained(tmp_path / "p")
    assert hf(text=["a cat"], return_for_image_generation=True, ratio="1:1",
              image_area=32 * 32)["input_ids"][0] == processor.text_to_image_ids("a cat")


# ----------------------------------------------------------------------------- generation


def emu3_generate(model, processor, prompts: list[list[int]], guidance_scale: float, **kwargs) -> torch.Tensor:
    """Emu3's own image generation, as its docs write it: ``generate`` with a
    ``prefix_allowed_tokens_fn`` (visual ids, an end-of-line after every row, then end-of-frame,
    image end, eos) and its classifier-free guidance (``negative_prompt_ids`` + ``guidance_scale``).
    Returns the visual ids ``[N, h*w]`` (the end-of-lines taken out)."""
    h, w = processor.grid_shape
    visual = model.vocabulary_mapping.image_tokens
    wrapper = processor.boi_token_id
    forced = {(w + 1) * h + 1: processor.eof_token_id, (w + 1) * h + 2: processor.eoi_token_id,
              (w + 1) * h + 3: processor.eos_token_id}

    def prefix_allowed_tokens_fn(batch_id, input_ids):
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][-1]
        offset = input_ids.shape[0] - position
        if offset % (w + 1) == 0:
            return [processor.eol_token_id]
        if offset in forced:
            return [forced[offset]]
        return [processor.pad_token_id] if offset > (w + 1) * h + 3 else visual

    batch = processor.pad(prompts, padding_side="left")
    negative = processor.pad([processor.unconditional_prompt_ids()] * len(prompts), padding_side="left")
    out = model.generate(**batch, max_new_tokens=(w + 1) * h, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                         negative_prompt_ids=negative["input_ids"],
                         negative_prompt_attention_mask=negative["attention_mask"],
                         guidance_scale=guidance_scale, pad_token_id=processor.pad_token_id, **kwargs)
    grid = out[:, batch["input_ids"].shape[1]:].view(len(prompts), h, w + 1)
    assert (grid[:, :, w] == processor.eol_token_id).all()
    return grid[:, :, :w].reshape(len(prompts), h * w)


def test_greedy_cfg_image_ids_equal_emu3s_generate(emu3):
    from unimodal.generation import SamplingConfig
    from unimodal.generation.images import sample_image_tokens

    model, processor = emu3
    prompts = [processor.text_to_image_ids(c) for c in ("a red square", "two blue circles on grass", "x")]
    for scale in (1.0, 3.0):
        theirs = emu3_generate(model, processor, prompts, scale, do_sample=False)
        ours = sample_image_tokens(model, processor, prompts, SamplingConfig(guidance_scale=scale, do_sample=False),
                                   progress=False)
        assert torch.equal(ours, theirs), scale
        assert ours.unique().numel() > 3  # not a degenerate constant image
    static = sample_image_tokens(model, processor, prompts, SamplingConfig(guidance_scale=3.0, do_sample=False),
                                 progress=False, static_cache=True)
    assert torch.equal(static, theirs)


def test_sampling_is_seeded_per_row_and_jacobi_is_refused(emu3):
    from unimodal.generation import SamplingConfig
    from unimodal.generation.images import generate_images, sample_image_tokens

    model, processor = emu3
    prompts = [processor.text_to_image_ids(c) for c in ("a red square", "a cat")]
    sampling = SamplingConfig(guidance_scale=3.0, top_k=16)
    both = sample_image_tokens(model, processor, prompts, sampling, seed=5, progress=False)
    alone = sample_image_tokens(model, processor, prompts[1:], sampling, seed=6, progress=False)
    assert torch.equal(both[1:], alone) and processor.vocab.is_image(both).all()
    with pytest.raises(ValueError, match="decoding='token'"):
        sample_image_tokens(model, processor, prompts, sampling, seed=5, progress=False, decoding="jacobi")
    pictures = generate_images(model, processor, ["a red square", "a cat"], guidance_scale=3.0, seed=5,
                               progress=False)
    assert [p.size for p in pictures] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2


def test_global_rng_sampled_ids_equal_emu3s_generate(emu3):
    """``rng="global"``: one ``torch.multinomial`` per step over Emu3's whole vocabulary on the global
    generator (its forced end-of-line draws included), as Emu3's ``generate`` draws: the same sampled
    visual ids for the same seed and settings."""
    from unimodal.generation import SamplingConfig
    from unimodal.generation.images import sample_image_tokens

    model, processor = emu3
    prompts = [processor.text_to_image_ids(c) for c in ("a red square", "two blue circles on grass")]
    for seed, settings in ((0, dict(guidance_scale=3.0, temperature=1.0, top_k=16)),
                           (1, dict(guidance_scale=2.0, temperature=0.7, top_k=32, top_p=0.9))):
        torch.manual_seed(seed)
        theirs = emu3_generate(model, processor, prompts, do_sample=True, **settings)
        ours = sample_image_tokens(model, processor, prompts, SamplingConfig(**settings), seed=seed,
                                   progress=False, rng="global")
        assert torch.equal(ours, theirs), seed
        assert len(theirs.unique()) > 8  # sampled, not a constant image
        rows = sample_image_tokens(model, processor, prompts, SamplingConfig(**settings), seed=seed, progress=False)
        assert not torch.equal(rows, ours)  # the default per-row streams are another draw


def test_sampling_distribution_equals_emu3s_generate_step_by_step(emu3):
    """Emu3's ``generate`` draws with ``torch.multinomial`` from one global stream, our default by
    inverse CDF from per-row streams (`RowUniforms`; the same ids only with ``rng="global"``, tested
    above). What must agree in both is the distribution each token is drawn from: Emu3's sampled
    image is fed back through our decoder and sampler and, at every visual step, our guided top-k
    distribution equals its ``output_scores``."""
    from unimodal.generation import SamplingConfig
    from unimodal.generation.sampling import TokenSampler

    model, processor = emu3
    h, w = processor.grid_shape
    lo, hi = processor.image_token_range
    prompts = [processor.text_to_image_ids(c) for c in ("a red square", "two blue circles on grass")]
    batch = processor.pad(prompts, padding_side="left")
    negative = processor.pad([processor.unconditional_prompt_ids()] * 2, padding_side="left")
    torch.manual_seed(3)
    visual = model.vocabulary_mapping.image_tokens

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - batch["input_ids"].shape[1] + 1
        return [processor.eol_token_id] if offset % (w + 1) == 0 else visual

    out = model.generate(**batch, max_new_tokens=(w + 1) * h - 1, prefix_allowed_tokens_fn=allowed,
                         negative_prompt_ids=negative["input_ids"],
                         negative_prompt_attention_mask=negative["attention_mask"], guidance_scale=3.0,
                         do_sample=True, top_k=16, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=processor.pad_token_id)
    steps = [t for t in range((w + 1) * h - 1) if t % (w + 1) != w]  # the visual positions
    theirs = torch.stack([out.scores[t].softmax(-1)[:, lo:hi] for t in steps], 1)  # [B, h*w, K]
    assert ((theirs > 0).sum(-1) == 16).all()  # top-k 16 over the visual ids, guided
    codes = out.sequences[:, batch["input_ids"].shape[1]:][:, steps]  # [B, h*w] visual ids
    sampler = TokenSampler(SamplingConfig(guidance_scale=3.0, top_k=16))
    both = processor.pad(prompts + [processor.unconditional_prompt_ids()] * 2, padding_side="left")
    decoder = processor.image_decoder(model, (lo, hi), both["input_ids"].shape[1] + h * w + 1, False, False)
    with torch.no_grad():
        logits = decoder.prefill(both["input_ids"], both["attention_mask"])
        for t in range(h * w):
            ours = sampler.distribution(codes[:, :t], sampler.scores(codes[:, :t], logits))
            torch.testing.assert_close(ours, theirs[:, t], rtol=1e-4, atol=1e-6)
            if t + 1 < h * w:
                logits = decoder.step(torch.cat([codes[:, t], codes[:, t]]))


# ----------------------------------------------------------------------------- training and saving


def training_batch(processor) -> dict:
    """Two t2i samples and one i2t sample, right-padded; labels on the image span / the caption."""
    codes = processor.encode_images(images(3, seed=7))
    rows, labels = [], []
    for i, caption in enumerate(("a red square", "a blue circle")):
        ids = processor.text_to_image_ids(caption, codes[i])
        prompt = len(processor.text_to_image_ids(caption))
        rows.append(ids)
        labels.append([-100] * prompt + ids[prompt:])
    ids = processor.image_to_text_ids(codes[2], "grey noise")
    prompt = len(processor.image_to_text_ids(codes[2]))
    rows.append(ids)
    labels.append([-100] * prompt + ids[prompt:])
    batch = processor.pad(rows)
    longest = batch["input_ids"].shape[1]
    batch["labels"] = torch.tensor([row + [-100] * (longest - len(row)) for row in labels])
    return dict(batch)


def train_steps(model, batch, steps: int = 3, lr: float = 1e-2) -> list[float]:
    from unimodal.training.loss import batch_loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = batch_loss(model, batch, "chunked")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def test_chunked_loss_is_exact_on_emu3(emu3):
    from unimodal.training.loss import causal_lm_loss
    from unimodal.training.loss_choice import chunked_loss_refusal

    model, processor = emu3
    batch = training_batch(processor)
    assert chunked_loss_refusal(model) is None
    ours = causal_lm_loss(model, **batch, chunk_size=7)
    theirs = model(**batch).loss
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    assert int(ours.num_tokens.sum()) == int((batch["labels"][:, 1:] != -100).sum())


def test_full_finetune_step_lowers_loss_and_saves_in_emu3s_format(emu3, emu3_folder, tmp_path):
    from transformers import Emu3ForConditionalGeneration

    from unimodal.bases import base_for
    from unimodal.generation import model_sampling

    base = base_for(emu3_folder)
    model = base.load_model(emu3_folder)
    processor = emu3[1]
    assert not any(p.requires_grad for p in model.model.vqmodel.parameters())
    assert model_sampling(model, "image")[0].guidance_scale == 3.0  # Emu3-Gen's defaults
    vq_before = {k: v.clone() for k, v in model.model.vqmodel.state_dict().items()}
    batch = training_batch(processor)
    losses = train_steps(model, batch)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.model.vqmodel.state_dict()[k]) for k, v in vq_before.items())
    base.save_model(model, tmp_path / "ft")
    reloaded = Emu3ForConditionalGeneration.from_pretrained(tmp_path / "ft").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert model_sampling(reloaded, "image")[0].top_k == 2048


@pytest.mark.parametrize("rows", ["trainable_tokens", "frozen", "modules_to_save", "image_head_rows"])
def test_lora_trains_what_it_says_and_merges_into_emu3s_format(emu3, emu3_folder, tmp_path, rows):
    from transformers import Emu3ForConditionalGeneration

    from unimodal.bases.emu3 import apply_lora, image_row_ids, load_model, save_model
    from unimodal.finetune.lora import LoraArguments

    processor = emu3[1]
    model = load_model(emu3_folder)
    args = (LoraArguments(use_lora=True, lora_r=4, trainable_parts=rows) if rows == "image_head_rows"
            else LoraArguments(use_lora=True, lora_r=4, new_token_rows=rows))
    peft_model = apply_lora(model, args)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and not any("vqmodel" in n for n in trainable)
    assert any("lora_" in n for n in trainable) == (rows != "image_head_rows")
    assert any("trainable_tokens" in n for n in trainable) == (rows in ("trainable_tokens", "image_head_rows"))
    assert any("modules_to_save" in n for n in trainable) == (rows == "modules_to_save")
    batch = training_batch(processor)
    losses = train_steps(peft_model, batch)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        expected = peft_model(**batch).logits
    merged = peft_model.merge_and_unload()
    save_model(merged, tmp_path / "lora")
    reloaded = Emu3ForConditionalGeneration.from_pretrained(tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    if rows == "image_head_rows":  # only the visual/control rows of lm_head moved
        original = Emu3ForConditionalGeneration.from_pretrained(emu3_folder)
        moved = (reloaded.lm_head.weight != original.lm_head.weight).any(-1).nonzero().flatten().tolist()
        assert moved and set(moved) <= set(image_row_ids(original))


def test_data_pipeline_keeps_emu3s_span_and_trains(emu3):
    """Pre-tokenisation writes Emu3's sequences; the collator's loss masks and truncation respect the span."""
    import datasets
    import numpy as np
    from PIL import Image

    from unimodal.data import UnimodalCollator
    from unimodal.data.format import SequenceFormat, loss_mask
    from unimodal.data.pretokenize import PretokenizeOptions, pretokenize
    from unimodal.training.loss import batch_loss, causal_lm_loss

    model, processor = emu3
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(4)]
    captions = ["a red square", "a blue circle", "grey noise", "two cats"]
    source = datasets.Dataset.from_dict({"image": pictures, "caption": captions})
    result = pretokenize(source, processor, PretokenizeOptions(tasks=("t2i", "i2t")))
    codes = processor.encode_images(pictures[0])[0]
    rows = [result.dataset[i] for i in range(len(result.dataset))]
    t2i = next(r for r in rows if r["task"] == "t2i" and r["input_ids"][1:3] == processor.encode_text(captions[0])[:2])
    assert t2i["input_ids"] == processor.text_to_image_ids(captions[0], codes)
    fmt = SequenceFormat.from_processor(processor)
    i2t = np.array(next(r for r in rows if r["task"] == "i2t")["input_ids"])
    text_targets = i2t[loss_mask(i2t, fmt, "text")]
    assert not np.isin(text_targets, list(processor.span_control_ids)).any()  # no row ends as text targets
    image_targets = np.array(t2i["input_ids"])[loss_mask(np.array(t2i["input_ids"]), fmt, "image")]
    assert (image_targets == processor.eol_token_id).sum() == processor.grid_shape[0]
    collator = UnimodalCollator(processor, max_length=512, packing=True, cfg_dropout=0.5)
    batch = collator([[dict(row, index=i) for i, row in enumerate(rows)]])
    torch.testing.assert_close(causal_lm_loss(model, **batch).loss, model(**batch).loss)  # eval: no dropout
    try:
        model.train()
        batch_loss(model, batch, "chunked").backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        model.eval().zero_grad(set_to_none=True)
    # a too-long caption loses caption tokens, never the size header or the image span
    long = processor.text_to_image_ids("the cat the dog the sea a photo", codes)
    cond = len(processor.text_to_image_ids("the cat the dog the sea a photo"))
    cut = UnimodalCollator(processor, max_length=len(long) - 3).sample(
        {"input_ids": long, "task": "t2i", "cond_len": cond, "index": 0})[0].tolist()
    assert cut[-processor.span_length - 1:] == long[-processor.span_length - 1:]
    assert cut[:2] == long[:2] and len(cut) == len(long) - 3


def test_pipeline_saves_loads_and_generates(emu3, tmp_path):
    """`UnimodalPipeline` on Emu3: saved in Emu3's format + our processor, reloaded, same images."""
    from transformers import Emu3ForConditionalGeneration

    from unimodal import UnimodalPipeline
    from unimodal.bases.emu3 import Emu3Processor

    model, processor = emu3
    UnimodalPipeline(model, processor).save_pretrained(tmp_path / "pipe")
    pipe = UnimodalPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.processor, Emu3Processor)
    assert isinstance(Emu3ForConditionalGeneration.from_pretrained(tmp_path / "pipe"), Emu3ForConditionalGeneration)
    kwargs = dict(guidance_scale=3.0, do_sample=False, progress=False)
    import numpy as np

    from unimodal.generation import generate_images

    ours = np.stack([np.asarray(im) for im in pipe.generate_images(["a red square", "a cat"], **kwargs)])
    direct = np.stack([np.asarray(im) for im in generate_images(model, processor, ["a red square", "a cat"],
                                                                 **kwargs)])
    assert ours.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and (ours == direct).all()


# ----------------------------------------------------------------------------- recipes end to end


@pytest.fixture(scope="module")
def recipe_data(emu3, tmp_path_factory):
    """24 digits tokenised by the recipe with an 8 px Emu3 processor folder (as docs/bases/emu3.md
    shows for a non-default size), t2i + i2t."""
    from digits import load_digits_dataset  # examples/digits/digits.py, on pytest's pythonpath

    from unimodal.recipes import tokenize_dataset

    root = tmp_path_factory.mktemp("emu3_data")
    emu3[1].save_pretrained(root / "processor")
    load_digits_dataset(image_size=IMAGE_SIZE, split="train").select(range(24)).save_to_disk(str(root / "source"))
    tokenize_dataset.main(["--source", str(root / "source"), "--processor", str(root / "processor"),
                           "--tasks", "t2i", "i2t", "--output_dir", str(root / "data"),
                           "--cache_dir", str(root / "cache")])
    return root / "data"


def test_recipes_tokenize_finetune_reload_generate(emu3_folder, recipe_data, tmp_path):
    """tokenize-dataset -> finetune (LoRA + visual rows) from the raw Emu3 folder -> Emu3's own class
    loads the result -> UnimodalPipeline generates from it."""
    from transformers import Emu3ForConditionalGeneration

    from unimodal import UnimodalPipeline
    from unimodal.bases.emu3 import Emu3Processor
    from unimodal.recipes import finetune

    before = Emu3ForConditionalGeneration.from_pretrained(emu3_folder).state_dict()
    final = finetune.main(["--model_name_or_path", str(emu3_folder), "--dataset_path", str(recipe_data),
                           "--tasks", "t2i", "i2t", "--eval_size", "4", "--max_length", "64",
                           "--per_device_batch_size", "4", "--max_steps", "3", "--learning_rate", "3e-3",
                           "--warmup_steps", "0", "--mixed_precision", "no", "--report_to", "none",
                           "--use_lora", "true", "--output_dir", str(tmp_path / "run")])
    after = Emu3ForConditionalGeneration.from_pretrained(final).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any("vqmodel" in k for k in changed)
    pipe = UnimodalPipeline.from_pretrained(final)
    assert isinstance(pipe.processor, Emu3Processor) and pipe.processor.grid_shape == (4, 4)  # the data's size
    images = pipe.generate_images(["a handwritten digit three"], 2, seed=0, progress=False)
    assert len(images) == 2 and images[0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_recipes_image_head_rows_and_adapter(emu3_folder, recipe_data, tmp_path):
    from transformers import Emu3ForConditionalGeneration

    from unimodal import UnimodalPipeline
    from unimodal.bases.emu3 import image_row_ids
    from unimodal.recipes import finetune

    common = ["--model_name_or_path", str(emu3_folder), "--dataset_path", str(recipe_data), "--tasks", "t2i",
              "--eval_size", "4", "--max_length", "64", "--per_device_batch_size", "4", "--max_steps", "2",
              "--learning_rate", "3e-3", "--warmup_steps", "0", "--mixed_precision", "no", "--report_to", "none",
              "--use_lora", "true"]
    original = Emu3ForConditionalGeneration.from_pretrained(emu3_folder)
    final = finetune.main([*common, "--trainable_parts", "image_head_rows", "--output_dir", str(tmp_path / "rows")])
    before, after = original.state_dict(), Emu3ForConditionalGeneration.from_pretrained(final).state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"lm_head.weight"}
    rows = (before["lm_head.weight"] != after["lm_head.weight"]).any(1).nonzero().flatten().tolist()
    assert rows and set(rows) <= set(image_row_ids(original))
    final = finetune.main([*common, "--merge_lora", "false", "--output_dir", str(tmp_path / "adapter")])
    pipe = UnimodalPipeline.from_pretrained(final)  # the raw base + the adapter, merged
    assert pipe.generate_images("a cat", seed=0, progress=False)[0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_captioning_after_an_emu3_image_emits_text_only(emu3):
    """Image-to-text through `UnimodalPipeline`: the image goes in as Emu3's span, and the answer never
    holds visual or span control tokens (they are blocked outside a span)."""
    import numpy as np
    from PIL import Image

    from unimodal import UnimodalPipeline

    model, processor = emu3
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    pipe = UnimodalPipeline(model, processor)
    for kwargs in (dict(do_sample=False), dict(do_sample=True, temperature=1.5, seed=1)):
        (answer,) = pipe.generate_text(["<image>what is it?"], images=[picture], max_new_tokens=24, **kwargs)
        assert isinstance(answer, str) and answer and "<|" not in answer, answer
