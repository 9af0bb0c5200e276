"""Speculative Jacobi decoding and the static-cache / compiled decode step of image generation.

The references are token-by-token decoding (greedy: token for token) and, for sampling, the exact
distribution of the first image tokens computed from uncached forwards over every prefix.
"""

import itertools
import warnings

import pytest
import torch
from PIL import Image
from transformers import TopKLogitsWarper, TopPLogitsWarper

from unimodal.generation import DecodeStats, JacobiDecoding, SamplingConfig, generate_images, sample_image_tokens

SCALE = 0.5  # std of the random image rows: first-token probabilities ~0.5 / 0.3 / 0.2 below
PROMPTS = ["a cat", "the quick brown fox jumps over the lazy dog", "a handwritten digit seven"]


def with_random_image_rows(pipe):
    """`add_image_tokens` starts the image rows of the embeddings and the head alike (mean init),
    so a random model's image distribution is uniform; random rows make it peaked and varied."""
    model, processor = pipe.model, pipe.processor
    lo, hi = processor.image_token_range
    torch.manual_seed(0)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            table[lo:hi] = torch.randn(hi - lo, table.shape[1]) * SCALE
    return model, processor


@pytest.fixture(scope="module")
def lm(tiny_pipeline_factory):
    """A tiny random Llama with 16 grey levels, 8x8 images in 2x2 blocks (16 image tokens)."""
    return with_random_image_rows(tiny_pipeline_factory(image_size=8, pixel_size=2))


def rows_of(processor, prompts=PROMPTS):
    return [processor.text_to_image_ids(p) for p in prompts]


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_greedy_jacobi_is_greedy_token_by_token_exactly(lm, window, guidance):
    model, processor = lm
    sampling = SamplingConfig(guidance_scale=guidance, do_sample=False)
    token = sample_image_tokens(model, processor, rows_of(processor), sampling, progress=False)
    stats = DecodeStats()
    jacobi = sample_image_tokens(model, processor, rows_of(processor), sampling, progress=False,
                                 decoding="jacobi", window=window, stats=stats)
    assert torch.equal(jacobi, token)
    assert stats.tokens == 3 * processor.num_image_tokens
    assert stats.forward_passes <= processor.num_image_tokens  # at least one token per pass, the prefill's too


def test_the_prefill_verifies_the_first_window(lm):
    """Where every draft is right, a span within one window takes one pass: the prefill."""
    import copy

    model, processor = lm
    model = copy.deepcopy(model)
    lo, hi = processor.image_token_range
    with torch.no_grad():  # equal image rows: every image logit ties, so greedy picks code 0 (the first draft)
        model.get_output_embeddings().weight[lo:hi] = 0.0
    sampling = SamplingConfig(guidance_scale=3.0, do_sample=False)
    stats = DecodeStats()
    codes = sample_image_tokens(model, processor, rows_of(processor), sampling, progress=False, decoding="jacobi",
                                window=processor.num_image_tokens, stats=stats)
    assert (codes == lo).all()
    assert stats.forward_passes == 1 and stats.accepted == 3 * (processor.num_image_tokens - 1)


def test_rows_accept_different_counts_and_do_not_depend_on_their_batch(lm):
    model, processor = lm
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.4, top_k=10, top_p=0.95)
    rows = rows_of(processor)
    together = sample_image_tokens(model, processor, rows, sampling, seed=7, progress=False,
                                   decoding="jacobi", window=4)
    passes = []  # drafts each row accepted when alone
    for i, row in enumerate(rows):
        stats = DecodeStats()
        alone = sample_image_tokens(model, processor, [row], sampling, seed=7 + i, progress=False,
                                    decoding="jacobi", window=4, stats=stats)
        assert torch.equal(alone[0], together[i])
        passes.append(stats.accepted)
    assert len(set(passes)) > 1, f"the rows accepted the same counts ({passes}): the batch test is vacuous"
    again = sample_image_tokens(model, processor, rows, sampling, seed=7, progress=False, decoding="jacobi", window=4)
    assert torch.equal(again, together)
    lo, hi = processor.image_token_range
    assert ((together >= lo) & (together < hi)).all()  # the span holds image ids only


# ---------------------------------------------------------------------------- the distribution

@torch.no_grad()
def exact_marginals(model, processor, sampling: SamplingConfig, prompt: list[int], depth: int) -> list[torch.Tensor]:
    """The exact distribution ``[K]`` of each of the first ``depth`` image tokens: every prefix
    of codes run through the model uncached (cond and uncond prompts separately), guidance,
    temperature and transformers' top-k / top-p warpers."""
    lo, hi = processor.image_token_range
    k = hi - lo
    uncond = processor.unconditional_prompt_ids()
    warpers = [TopKLogitsWarper(sampling.top_k), TopPLogitsWarper(sampling.top_p)]
    joint = torch.ones(1)  # P(prefix) over all prefixes of the current length, in itertools order
    marginals = []
    for j in range(depth):
        prefixes = [list(c) for c in itertools.product(range(k), repeat=j)]
        logits = [model(input_ids=torch.tensor([head + [lo + c for c in pre] for pre in prefixes])).logits[:, -1, lo:hi]
                  for head in (prompt, uncond)]
        scores = (logits[1] + sampling.guidance_scale * (logits[0] - logits[1])) / sampling.temperature
        for warper in warpers:
            scores = warper(None, scores)
        step = scores.softmax(-1)  # [prefixes, K]
        marginals.append((joint[:, None] * step).sum(0))
        joint = (joint[:, None] * step).reshape(-1)
    return marginals


class AcceptAll(JacobiDecoding):
    """A wrong rule (every draft accepted): the test below must tell it apart."""

    def accept(self, p_draft, q_draft, u):
        return torch.ones_like(u, dtype=torch.bool)


class IgnoreDraftProbability(JacobiDecoding):
    """A subtler wrong rule: accept with probability p(d), as if every draft had q(d) = 1."""

    def accept(self, p_draft, q_draft, u):
        return u < p_draft


class KeepEveryDraft(JacobiDecoding):
    """A wrong coupling: drafts past a rejection are kept as they are, though the next pass tests
    them against this pass's distribution (as if they had been drawn from it)."""

    def keep(self, p_draft, q_draft, u):
        return torch.ones_like(u, dtype=torch.bool)


# Total variation between 12,000 draws and the exact distribution: ~0.01-0.015 for these tokens.
SAMPLES, DEPTH, TOLERANCE = 12_000, 3, 0.035


@pytest.fixture(scope="module")
def distribution_case(tiny_pipeline_factory):
    # 4x4 images in 2x2 blocks: 4 image tokens, so the 12,000 rows are quick.
    model, processor = with_random_image_rows(tiny_pipeline_factory(image_size=4, pixel_size=2))
    # Guidance, temperature and both filters active (the filters cut the first token to 3 codes).
    sampling = SamplingConfig(guidance_scale=2.0, temperature=0.9, top_k=10, top_p=0.9)
    prompt = processor.text_to_image_ids(PROMPTS[0])
    return model, processor, sampling, prompt, exact_marginals(model, processor, sampling, prompt, DEPTH)


def empirical_distance(case, decoding) -> list[float]:
    """Total variation between the sampled and the exact distribution of each first token."""
    model, processor, sampling, prompt, exact = case
    ids = sample_image_tokens(model, processor, [prompt] * SAMPLES, sampling, seed=0, progress=False,
                              decoding=decoding)
    codes = ids[:, :DEPTH] - processor.image_token_range[0]
    k = exact[0].numel()
    return [0.5 * (torch.bincount(codes[:, j], minlength=k) / SAMPLES - exact[j]).abs().sum().item()
            for j in range(DEPTH)]


def test_jacobi_samples_the_token_by_token_distribution(distribution_case):
    token = empirical_distance(distribution_case, "token")
    jacobi = empirical_distance(distribution_case, JacobiDecoding(window=4))
    assert max(token) < TOLERANCE, f"token-by-token: {token}"  # the tolerance admits the exact sampler
    assert max(jacobi) < TOLERANCE, f"jacobi: {jacobi}"


@pytest.mark.parametrize("wrong", [AcceptAll, IgnoreDraftProbability, KeepEveryDraft])
def test_a_wrong_acceptance_rule_fails_the_distribution_test(distribution_case, wrong):
    distances = empirical_distance(distribution_case, wrong(window=4))
    assert max(distances) > TOLERANCE, f"{wrong.__name__} passed: {distances}"


# ---------------------------------------------------------------------------- static / compiled

@pytest.mark.parametrize("decoding", ["token", "jacobi"])
def test_static_cache_equals_the_dynamic_cache(lm, decoding):
    model, processor = lm
    for sampling in (SamplingConfig(guidance_scale=3.0, temperature=0.8, top_k=8), SamplingConfig(do_sample=False)):
        eager = sample_image_tokens(model, processor, rows_of(processor), sampling, seed=3, progress=False,
                                    decoding=decoding, window=4)
        static = sample_image_tokens(model, processor, rows_of(processor), sampling, seed=3, progress=False,
                                     decoding=decoding, window=4, static_cache=True)
        assert torch.equal(static, eager)


def compiled_equals_eager(lm, backend: str, decoding: str) -> None:
    model, processor = lm
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0.8, top_k=8)
    options = dict(seed=5, progress=False, decoding=decoding, window=4)
    eager = sample_image_tokens(model, processor, rows_of(processor), sampling, **options)
    first, second = DecodeStats(), DecodeStats()
    for stats in (first, second):
        got = sample_image_tokens(model, processor, rows_of(processor), sampling, compile=backend, stats=stats,
                                  **options)
        assert torch.equal(got, eager)
    assert first.compile_seconds > 0 and second.compile_seconds == 0  # the warm-up is once, and reported


@pytest.mark.parametrize("decoding", ["token", pytest.param("jacobi", marks=pytest.mark.slow)])  # ~60 s: dynamic shapes
def test_compiled_step_equals_eager(lm, decoding):
    compiled_equals_eager(lm, "aot_eager", decoding)  # dynamo's tracing of the static-cache passes, no code generation


@pytest.mark.slow
@pytest.mark.parametrize("decoding", ["token", "jacobi"])
def test_inductor_compiled_step_equals_eager(lm, decoding):
    compiled_equals_eager(lm, "inductor", decoding)  # C++ code generation: ~2-3 min each on 2 busy cores


def test_a_model_used_with_a_static_cache_and_compile_is_freed(tiny_pipeline_factory):
    # The kept state (compiled callable, caches, sliced head) lives on the model: nothing else
    # holds the model once the caller lets it go.
    import gc
    import weakref

    model, processor = with_random_image_rows(tiny_pipeline_factory(image_size=8, pixel_size=2))
    sample_image_tokens(model, processor, rows_of(processor)[:1], SamplingConfig(do_sample=False), progress=False,
                        static_cache=True, compile="eager")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_compile_falls_back_with_one_warning(lm):
    model, processor = lm
    sampling = SamplingConfig(do_sample=False)
    eager = sample_image_tokens(model, processor, rows_of(processor), sampling, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got = sample_image_tokens(model, processor, rows_of(processor), sampling, progress=False,
                                      compile="no-such-backend")
            assert torch.equal(got, eager)
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(messages) == 1 and "no-such-backend" in messages[0], messages


def test_generate_images_takes_the_decoding_options(lm):
    model, processor = lm
    kwargs = dict(guidance_scale=3.0, do_sample=False, progress=False)
    token = generate_images(model, processor, PROMPTS[:2], **kwargs)
    jacobi = generate_images(model, processor, PROMPTS[:2], decoding="jacobi", window=5, static_cache=True, **kwargs)
    assert [a.tobytes() for a in token] == [b.tobytes() for b in jacobi]
    with pytest.raises(ValueError, match="decoding must be one of"):
        generate_images(model, processor, "x", decoding="parallel", progress=False)
    with pytest.raises(ValueError, match="window must be >= 1"):
        generate_images(model, processor, "x", decoding="jacobi", window=0, progress=False)


# ---------------------------------------------------------------------------- the front ends

@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_factory):
    return tiny_pipeline_factory(image_size=8, pixel_size=2)


def test_generate_recipe_takes_the_decoding_options(pipeline, tmp_path):
    from unimodal.errors import UserError
    from unimodal.recipes import generate as recipe

    pipeline.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--prompts", "a cat", "--num_images_per_prompt", "2",
              "--do_sample", "false", "--guidance_scale", "3"]
    recipe.main(common + ["--output_dir", str(tmp_path / "token")])
    record = recipe.main(common + ["--output_dir", str(tmp_path / "jacobi"), "--decoding", "jacobi", "--window", "4",
                                   "--static_cache", "true"])
    assert record["config"]["decoding"] == "jacobi" and record["config"]["window"] == 4
    for i in range(2):  # greedy: the same images
        token, jacobi = (Image.open(tmp_path / run / f"images/{i:04d}.png").tobytes() for run in ("token", "jacobi"))
        assert token == jacobi
    with pytest.raises(UserError, match="decoding must be one of"):
        recipe.main(common + ["--decoding", "fast"])


def test_web_demo_handler_takes_the_decoding(pipeline):
    import gradio as gr

    from unimodal.webdemo import DemoHandlers

    handlers = DemoHandlers(pipeline)
    args = ("a cat", 2, 3.0, 0.9, 8, 0.99, 5)
    jacobi = handlers.text_to_image(*args, "jacobi")
    assert [label for _, label in jacobi] == ["seed 5", "seed 6"]
    expected = pipeline.generate_images("a cat", 2, guidance_scale=3.0, temperature=0.9, top_k=8, top_p=0.99,
                                        seed=5, decoding="jacobi", progress=False)
    assert [im.tobytes() for im, _ in jacobi] == [im.tobytes() for im in expected]
    with pytest.raises(gr.Error, match="Decoding must be one of"):
        handlers.text_to_image(*args, "fast")
