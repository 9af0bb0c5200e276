"""Pre-tokenisation, fitting, packing, loss masks, condition dropout and packed attention."""

import io
import json
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from unimodal import PixelTokenizer
from unimodal.data import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    PretokenizeOptions,
    SequenceFormat,
    UnimodalCollator,
    fit_sample,
    load_pretokenized,
    make_dataloader,
    pack_lengths,
    pretokenize,
    save_pretokenized,
    shard_bounds,
)
from unimodal.offline import build_causal_lm

WORDS = "a small red cat sits on the mat by the sea under blue sky".split()


def _image(rng: np.random.Generator, size: int = 8) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")


def _caption(rng: np.random.Generator, lo: int = 1, hi: int = 24) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


@pytest.fixture(scope="module")
def processor(tiny_pipeline_factory):
    # 8x8 images, 2x2 pixel blocks: 4x4 = 16 image tokens, so spans are 18 tokens long.
    return tiny_pipeline_factory(image_size=8, pixel_size=2).processor


@pytest.fixture(scope="module")
def captioned():
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict(
        {"image": [_image(rng) for _ in range(40)], "caption": [_caption(rng) for _ in range(40)],
         "label": list(range(40))},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "label": datasets.Value("int64")}))


@pytest.fixture(scope="module")
def documents():
    rng = np.random.default_rng(1)
    texts, images = [], []
    for _ in range(24):
        k = int(rng.integers(0, 4))
        texts.append("".join(f"{_caption(rng, 0, 8)} <image> " for _ in range(k)) + _caption(rng, 1, 8))
        images.append([_image(rng) for _ in range(k)])
    return datasets.Dataset.from_dict({"text": texts, "images": images}, features=datasets.Features(
        {"text": datasets.Value("string"), "images": datasets.List(datasets.Image())}))


@pytest.fixture(scope="module")
def samples(processor, captioned, documents, tmp_path_factory):
    """Mixed t2i / i2t / interleaved samples of many lengths, as the collator sees them."""
    cache = tmp_path_factory.mktemp("cache")
    pairs = pretokenize(captioned, processor, PretokenizeOptions(tasks=("t2i", "i2t")), cache_dir=cache)
    docs = pretokenize(documents, processor, PretokenizeOptions(tasks=("interleaved",)), cache_dir=cache)
    return datasets.concatenate_datasets([pairs.dataset, docs.dataset])


# ------------------------------------------------------------------------------ pre-tokenisation
def test_pretokenize_matches_the_processor(processor, captioned, tmp_path):
    result = pretokenize(captioned, processor, PretokenizeOptions(tasks=("t2i", "i2t"), keep_columns=("label",)),
                         cache_dir=tmp_path, batch_size=16)
    ds = result.dataset
    assert result.stats.num_examples == 40 and result.stats.num_samples == 80 and result.stats.num_skipped == 0
    assert ds["task"] == ["t2i", "i2t"] * 40 and ds["source_index"] == [i // 2 for i in range(80)]
    assert ds["label"] == [i // 2 for i in range(80)]
    codes = processor.encode_images([captioned[i]["image"] for i in range(40)])  # the reference
    for i in (0, 7, 39):
        caption = captioned[i]["caption"]
        t2i, i2t = ds[2 * i], ds[2 * i + 1]
        assert t2i["input_ids"] == processor.text_to_image_ids(caption, codes[i])
        assert t2i["cond_len"] == len(processor.text_to_image_ids(caption))  # the generation prompt
        assert i2t["input_ids"] == processor.image_to_text_ids(codes[i], caption) and i2t["cond_len"] == 0
        assert t2i["length"] == len(t2i["input_ids"])


def test_pretokenize_interleaved_matches_the_processor(processor, documents, tmp_path):
    ds = pretokenize(documents, processor, PretokenizeOptions(tasks=("interleaved",)), cache_dir=tmp_path).dataset
    assert len(ds) == len(documents)
    for i in range(len(documents)):
        row = documents[i]
        ref = processor(row["text"], images=row["images"] or None, add_eos=True, padding=False)["input_ids"][0]
        assert ds[i]["input_ids"] == ref.tolist()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_images_are_skipped_and_counted(processor, tmp_path):
    rng = np.random.default_rng(2)
    good = [_image(rng) for _ in range(4)]
    for i, im in enumerate(good):
        im.save(tmp_path / f"ok{i}.png")
    (tmp_path / "truncated.png").write_bytes(_png(_image(rng))[:40])
    (tmp_path / "not_an_image.png").write_text("hello")
    rows = [{"image": "ok0.png", "caption": "zero"}, {"image": "truncated.png", "caption": "bad"},
            {"image": "ok1.png", "caption": "one"}, {"image": "not_an_image.png", "caption": "bad"},
            {"image": "missing.png", "caption": "bad"}, {"image": str(tmp_path / "ok2.png"), "caption": "two"},
            {"image": "ok3.png", "caption": None}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = datasets.load_dataset("json", data_files=str(tmp_path / "data.jsonl"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    result = pretokenize(source, processor, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert result.stats.num_skipped == 4 and result.stats.num_samples == 3
    reasons = "\n".join(result.stats.skipped)
    for row in (1, 3, 4, 6):
        assert f"row {row}:" in reasons
    assert "missing caption" in reasons
    assert result.dataset["source_index"] == [0, 2, 5]
    codes = processor.encode_images(good[:3])
    assert result.dataset[2]["input_ids"] == processor.text_to_image_ids("two", codes[2])


class CountingPixelTokenizer(PixelTokenizer):
    """The real tokenizer, counting how many images go through ``encode``."""

    calls = 0

    def encode(self, pixels):
        CountingPixelTokenizer.calls += len(pixels)
        return super().encode(pixels)


def test_second_run_reads_the_cache_without_encoding(processor, captioned, tmp_path):
    counting = CountingPixelTokenizer(processor.image_tokenizer.config)
    counting.palette.copy_(processor.image_tokenizer.palette)
    proc = type(processor)(processor.tokenizer, counting)
    options = PretokenizeOptions(tasks=("t2i",))
    first = pretokenize(captioned, proc, options, cache_dir=tmp_path)
    assert CountingPixelTokenizer.calls == 40
    again = pretokenize(captioned, proc, options, cache_dir=tmp_path)
    assert CountingPixelTokenizer.calls == 40  # nothing encoded
    assert again.dataset["input_ids"] == first.dataset["input_ids"]
    assert again.dataset.cache_files == first.dataset.cache_files
    # Anything the ids depend on changes the fingerprint: other tasks, other weights.
    pretokenize(captioned, proc, PretokenizeOptions(tasks=("i2t",)), cache_dir=tmp_path)
    assert CountingPixelTokenizer.calls == 80
    counting.palette.mul_(0.5)
    pretokenize(captioned, proc, options, cache_dir=tmp_path)
    assert CountingPixelTokenizer.calls == 120


@pytest.mark.parametrize("output_format", ["arrow", "parquet"])
def test_save_and_load_checks_the_processor(processor, captioned, tmp_path, output_format, tiny_pipeline_factory):
    options = PretokenizeOptions(tasks=("t2i",))
    result = pretokenize(captioned.select(range(5)), processor, options, cache_dir=tmp_path / "cache")
    save_pretokenized(result, tmp_path / "out", processor, options, output_format)
    loaded = load_pretokenized(tmp_path / "out", processor)
    assert loaded["input_ids"] == result.dataset["input_ids"] and loaded["task"] == ["t2i"] * 5
    mismatched = tiny_pipeline_factory(image_size=16, pixel_size=2).processor  # an 8x8 grid, not 4x4
    message = r"grid_shape=\[4, 4\] but this processor has \[8, 8\].*re-run .*recipes/tokenize_dataset.py"
    with pytest.raises(ValueError, match=message):
        load_pretokenized(tmp_path / "out", mismatched)


def test_shard_bounds_cover_rows_in_order():
    for n, k in [(10, 3), (3, 5), (0, 2), (1797, 8)]:
        bounds = [shard_bounds(n, k, i) for i in range(k)]
        assert [i for s, e in bounds for i in range(s, e)] == list(range(n))


# ------------------------------------------------------------------------------ fitting
def test_fit_sample_never_cuts_an_image_span(processor):
    fmt = SequenceFormat.from_processor(processor)
    codes = torch.zeros(processor.grid_shape, dtype=torch.long)
    caption = "a small red cat sits on the mat"
    n_caption = len(processor.encode_text(caption))
    t2i = np.array(processor.text_to_image_ids(caption, codes))
    cond = len(processor.text_to_image_ids(caption))
    # t2i: the caption loses its tail, the image stays whole and the prompt still ends in <boi>.
    ids, cond_len = fit_sample(t2i, "t2i", cond, len(t2i) - 2, fmt, "image")
    assert len(ids) == len(t2i) - 2 and cond_len == cond - 2
    assert ids.tolist() == t2i[: cond - 3].tolist() + t2i[cond - 1 :].tolist()
    assert fit_sample(t2i, "t2i", cond, len(t2i) - n_caption, fmt, "image") is None  # no caption left
    # i2t: the caption's tail goes; a cut inside the image drops the sample (no text target left).
    i2t = np.array(processor.image_to_text_ids(codes, caption))
    assert fit_sample(i2t, "i2t", 0, 22, fmt, "text")[0].tolist() == i2t[:22].tolist()
    assert fit_sample(i2t, "i2t", 0, 19, fmt, "text") is None
    # interleaved: a cut inside the second span moves to before its <boi>.
    doc = np.array(processor("hi <image> there <image> end", images=[_image(np.random.default_rng(0))] * 2,
                             add_eos=True, padding=False)["input_ids"][0].tolist())
    second_boi = int(np.flatnonzero(doc == processor.boi_token_id)[1])
    ids, _ = fit_sample(doc, "interleaved", 0, second_boi + 5, fmt, "all")
    assert ids.tolist() == doc[:second_boi].tolist()


def test_pack_lengths_is_valid_and_tight():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, 500)
    bins = pack_lengths(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(lengths[b].sum() <= 256 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 256 * 1.05)) + 1  # within 5% of the lower bound
    equal = pack_lengths([72] * 70, 512)
    assert len(equal) == 10 and equal == pack_lengths([72] * 70, 512)  # 7 per row, deterministic


# ------------------------------------------------------------------------------ packing + masks
def _expected_labels(ids, target, processor):
    """Reference mask, token by token, as documented in docs/data.md."""
    lo, hi = processor.image_token_range
    out = []
    for t, tok in enumerate(ids):
        image, control = lo <= tok < hi, tok in (processor.boi_token_id, processor.eoi_token_id)
        keep = {"all": True, "image": image or tok == processor.eoi_token_id,
                "text": not (image or control)}[target]
        out.append(tok if keep and t > 0 else IGNORE_INDEX)
    return out


def _segments(row_ids, row_labels, positions):
    """Split a packed row at every position reset."""
    starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
    return [(row_ids[a:b], row_labels[a:b]) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("max_length", [40, 64])
def test_packing_keeps_spans_whole_and_masks_as_documented(processor, samples, max_length):
    collator = UnimodalCollator(processor, max_length, packing=True, loss_on="auto")
    loader = make_dataloader(samples, collator, batch_size=4, shuffle=True, seed=3)
    plan = loader.dataset.plan
    assert plan.num_truncated + plan.num_dropped == sum(n > max_length for n in samples["length"])
    assert plan.num_truncated > 0
    fmt, n_img = collator.format, processor.num_image_tokens
    seen = []
    for batch in loader:
        assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
        assert batch["input_ids"].shape[1] <= max_length
        for r in range(len(batch["input_ids"])):
            ids, labels, pos = (batch[k][r].tolist() for k in ("input_ids", "labels", "position_ids"))
            for seg_ids, seg_labels in _segments(ids, labels, pos):
                if all(t == fmt.pad_token_id for t in seg_ids):
                    assert set(seg_labels) == {IGNORE_INDEX}  # the padding tail
                    continue
                # every <boi> is followed by exactly h*w image ids and <eoi>, inside this sample
                for b in [t for t, tok in enumerate(seg_ids) if tok == fmt.boi_token_id]:
                    span = seg_ids[b + 1 : b + 2 + n_img]
                    assert len(span) == n_img + 1 and span[-1] == fmt.eoi_token_id
                    assert processor.vocab.is_image(torch.tensor(span[:-1])).all()
                seen.append((tuple(seg_ids), tuple(seg_labels)))
    # Each kept sample appears exactly once per epoch, fitted, with the documented labels.
    expected = []
    for row in samples:
        target = collator.loss_on[row["task"]]
        fitted = fit_sample(np.array(row["input_ids"]), row["task"], row["cond_len"], max_length, fmt, target)
        if fitted is not None:
            ids = fitted[0].tolist()
            expected.append((tuple(ids), tuple(_expected_labels(ids, target, processor))))
    assert len(expected) == plan.num_samples - plan.num_dropped
    assert Counter(seen) == Counter(expected)


def test_padded_batches_are_length_grouped_with_attention_mask(processor, samples):
    collator = UnimodalCollator(processor, 128, packing=False)
    loader = make_dataloader(samples, collator, batch_size=8, seed=1)
    seen, waste, total = [], 0, 0
    for batch in loader:
        assert set(batch) == {"input_ids", "labels", "attention_mask", "use_cache"}
        mask = batch["attention_mask"].bool()
        assert (batch["labels"][~mask] == IGNORE_INDEX).all()
        assert (batch["input_ids"][~mask] == processor.pad_token_id).all()
        assert mask[:, 0].all() and (mask[:, :-1] >= mask[:, 1:]).all()  # right padding
        waste, total = waste + int((~mask).sum()), total + mask.numel()
        seen += [len(ids) for ids in batch["input_ids"]]
    assert len(seen) == len(samples)
    # grouping keeps padding small compared with a random order of the same lengths
    rng = np.random.default_rng(0)
    lengths = np.array(samples["length"])
    shuffled = rng.permutation(lengths)
    random_waste = sum(int(c.max() * len(c) - c.sum()) for c in np.array_split(shuffled, len(shuffled) // 8))
    assert waste < 0.5 * random_waste


def test_length_grouped_sampler_is_a_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(1, 100, 203)
    a, b = LengthGroupedSampler(lengths, 8, seed=1), LengthGroupedSampler(lengths, 8, seed=1)
    assert sorted(a) == list(range(203)) and list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)


# ------------------------------------------------------------------------------ condition dropout
def _t2i_rows(batch):
    """Stored-form samples of a padded batch (one sample per row)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_cfg_dropout_gives_exactly_the_unconditional_prompt(processor, samples):
    t2i = samples.filter(lambda task: task == "t2i", input_columns="task")
    uncond = processor.unconditional_prompt_ids()
    never = UnimodalCollator(processor, 128, cfg_dropout=0.0)
    always = UnimodalCollator(processor, 128, cfg_dropout=1.0)
    for kept, dropped in zip(
        make_dataloader(t2i, never, 1, shuffle=False), make_dataloader(t2i, always, 1, shuffle=False)
    ):
        kept, dropped = _t2i_rows(kept)[0], _t2i_rows(dropped)[0]
        span = kept[kept.index(processor.boi_token_id) + 1 :]  # image ids, <eoi>, <eos>
        assert dropped == uncond + span
        assert dropped[: len(uncond)] == processor.text_to_image_ids("")  # what generation feeds


def test_cfg_dropout_is_deterministic_per_seed_epoch_index(processor, samples):
    t2i = samples.filter(lambda task: task == "t2i", input_columns="task")
    uncond = processor.unconditional_prompt_ids()

    def dropped(seed, epoch):
        collator = UnimodalCollator(processor, 128, cfg_dropout=0.3, seed=seed)
        collator.set_epoch(epoch)
        rows = [_t2i_rows(b)[0] for b in make_dataloader(t2i, collator, 1, shuffle=False)]
        return [r[: len(uncond)] == uncond for r in rows]  # every caption here is non-empty

    first = dropped(0, 0)
    assert first == dropped(0, 0)
    assert first != dropped(0, 1) and first != dropped(1, 0)
    many = [d for e in range(5) for d in dropped(0, e)]
    assert 0.2 < np.mean(many) < 0.4


@pytest.mark.parametrize("packing", [True, False])
def test_resumed_loader_reproduces_batches_and_dropout(processor, samples, packing):
    """With infinite_batches, starting at step k yields exactly the batches (dropout included)
    that an uninterrupted run saw from step k on, across an epoch boundary."""
    from unimodal.training import infinite_batches, make_accelerator

    accelerator = make_accelerator(log_with=None, seed=5)

    def run(start, steps):
        collator = UnimodalCollator(processor, 96, packing=packing, cfg_dropout=0.5, seed=5)
        loader = accelerator.prepare(make_dataloader(samples, collator, batch_size=4, seed=5))
        per_epoch = len(loader)
        out = []
        for _step, batch in infinite_batches(accelerator, loader, start, per_epoch):
            out.append(batch["input_ids"])
            if len(out) == steps:
                return out, per_epoch, loader

    full, per_epoch, loader = run(0, 40)
    assert per_epoch < 30  # the run crosses into epoch 1
    resumed, _, _ = run(per_epoch - 3, 40 - (per_epoch - 3))
    assert len(resumed) == len(full[per_epoch - 3 :])
    for a, b in zip(full[per_epoch - 3 :], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], full[per_epoch])  # epoch 1 is a new order / new dropout
    if not packing:  # the epoch reached our length-grouped sampler through accelerate
        assert loader.batch_sampler.sampler.epoch == 1


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gpt2"])
def test_packed_logits_equal_each_sample_alone(processor, samples, model_type):
    model = build_causal_lm(model_type, vocab_size=len(processor.tokenizer) + 64).eval()
    collator = UnimodalCollator(processor, 96, packing=True)
    batch = next(iter(make_dataloader(samples, collator, batch_size=3, seed=0)))
    with torch.no_grad():
        packed = model(**batch)
        leaky = model(**{**batch, "use_cache": True}).logits  # the documented pitfall
    worst, worst_leaky, token_losses = 0.0, 0.0, []
    for r in range(len(batch["input_ids"])):
        pos = batch["position_ids"][r].tolist()
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            ids, labels = batch["input_ids"][r, a:b], batch["labels"][r, a:b]
            if (labels == IGNORE_INDEX).all():
                continue  # the padding tail
            with torch.no_grad():
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
            worst = max(worst, (packed.logits[r, a:b] - alone).abs().max().item())
            worst_leaky = max(worst_leaky, (leaky[r, a:b] - alone).abs().max().item())
            keep = labels[1:] != IGNORE_INDEX
            token_losses.append(torch.nn.functional.cross_entropy(alone[:-1][keep], labels[1:][keep], reduction="none"))
    assert worst < 1e-5
    assert worst_leaky > 1e-3  # the comparison can fail: a KV cache lets samples see each other
    # The packed loss is the mean over exactly the samples' own targets (no cross-sample target).
    assert torch.allclose(packed.loss, torch.cat(token_losses).mean(), atol=1e-5)


def test_collator_rejects_unplanned_rows(processor, samples):
    collator = UnimodalCollator(processor, 40, packing=True)
    rows = [[{**samples[i], "index": i} for i in range(4)]]
    with pytest.raises(ValueError, match="make_dataloader"):
        collator(rows)
    with pytest.raises(ValueError, match="packing=True"):
        UnimodalCollator(processor, 400, packing=False)(rows)
    with pytest.raises(ValueError, match="loss_on"):
        UnimodalCollator(processor, 40, loss_on="images")
    assert Counter(samples["task"]) == {"t2i": 40, "i2t": 40, "interleaved": 24}
    # A sample that cannot fit leaves no fully masked row behind (that would be NaN attention).
    i2t = next(i for i, r in enumerate(samples) if r["task"] == "i2t")
    text_only = next(i for i, r in enumerate(samples) if r["task"] == "interleaved" and r["length"] <= 19)
    batch = UnimodalCollator(processor, 19)([{**samples[i], "index": i} for i in (i2t, text_only)])
    assert batch["input_ids"].tolist() == [samples[text_only]["input_ids"]]


@pytest.mark.gpu
def test_gpu_encoding_matches_cpu(processor, captioned, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    options = PretokenizeOptions(tasks=("t2i",))
    on_cpu = pretokenize(captioned, processor, options, cache_dir=tmp_path / "cpu").dataset
    processor.image_tokenizer.to("cuda")
    try:
        on_gpu = pretokenize(captioned, processor, options, cache_dir=tmp_path / "gpu").dataset
    finally:
        processor.image_tokenizer.to("cpu")
    assert on_gpu["input_ids"] == on_cpu["input_ids"]


def test_format_of_a_base_with_a_prompt_suffix_and_span_control_ids():
    """Unified bases: a template between caption and <boi> survives truncation (the caption loses
    its last tokens instead), and span control ids count as image targets, not text ones."""
    from unimodal.data.format import SequenceFormat, loss_mask

    # <bos>=1 caption 10 11 12, suffix 7 8, <boi>=3, image ids 20 21, separator 5, <eoi>=4, <eos>=2
    fmt = SequenceFormat(0, 3, 4, (20, 22), (1, 7, 8, 3), caption_suffix_len=2, span_ids=(5,))
    ids = np.array([1, 10, 11, 12, 7, 8, 3, 20, 5, 21, 4, 2])
    fitted, cond_len = fit_sample(ids, "t2i", 7, len(ids) - 2, fmt, "image")
    assert fitted.tolist() == [1, 10, 7, 8, 3, 20, 5, 21, 4, 2] and cond_len == 5
    assert fit_sample(ids, "t2i", 7, len(ids) - 3, fmt, "image") is None  # no caption token left
    image = loss_mask(ids, fmt, "image")
    assert ids[image].tolist() == [20, 5, 21, 4]
    assert 5 not in ids[loss_mask(ids, fmt, "text")].tolist()
