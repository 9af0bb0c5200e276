"""Every `VQGANConfig.quantizer` (vq, fsq, lfq, simvq) behind the same `VQGAN` surface: shapes,
straight-through gradients, code round trips, collapse from a bad init, rank-synchronised
statistics on 2 gloo processes, safetensors round trip, `add_image_tokens`, fp32 under bf16
autocast, the tokenizer recipe; parity of the codes with `vector_quantize_pytorch`."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel

from unimodal import VQGAN, VQGANConfig, add_image_tokens
from unimodal.vq.implicit import FSQuantizer, LookupFreeQuantizer
from unimodal.vq.model import build_quantizer
from unimodal.vq.simvq import SimVQuantizer

ROOT = Path(__file__).resolve().parents[1]
# quantizer -> the VQGANConfig settings of a 64-code (32 for vq) tiny tokenizer
SETTINGS = {
    "vq": dict(codebook_size=32, embed_dim=4),
    "fsq": dict(codebook_size=64, embed_dim=3, fsq_levels=[4, 4, 4]),
    "lfq": dict(codebook_size=64, embed_dim=6),
    "simvq": dict(codebook_size=64, embed_dim=4),
}
QUANTIZERS = list(SETTINGS)


def tiny(quantizer: str, **overrides) -> VQGAN:
    torch.manual_seed(0)
    config = VQGANConfig(quantizer=quantizer, image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(), z_channels=8, num_groups=8, use_l2_norm=False,
                         **{**SETTINGS[quantizer], **overrides})
    return VQGAN(config)


def pixels(b=2, seed=0):
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_shapes_and_codes_round_trip_through_decode(quantizer):
    vq = tiny(quantizer).eval()
    k, d = vq.codebook_size, vq.config.embed_dim
    x = pixels(b=3)
    codes = vq.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < k
    out = vq(x)
    assert out.quantized.shape == (3, d, 8, 8) and out.reconstruction.shape == x.shape
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.quantized, vq.quantize.embed(codes))  # in eval: the codes' latents
    # decode(codes) is the decoder on exactly the latents the forward pass quantised to
    torch.testing.assert_close(vq.decode(codes), vq.decode_latents(out.quantized))
    # code space round trip, and code_vectors() is the table embed() reads
    table = vq.code_vectors()
    assert table.shape == (k, d) and table.dtype == torch.float32
    torch.testing.assert_close(vq.quantize.embed(codes), table[codes].permute(0, 3, 1, 2))
    assert torch.unique(table, dim=0).shape[0] == k
    if quantizer != "fsq":  # a code's latent is its own code (FSQ's lookup first squashes by tanh)
        assert torch.equal(vq.quantize.lookup(table.t().reshape(1, d, 1, k)).flatten(), torch.arange(k))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_straight_through_gradients_reach_the_encoder(quantizer):
    vq = tiny(quantizer).train()
    out = vq(pixels())
    ((out.reconstruction - pixels()).abs().mean() + out.quant_loss).backward()
    grad = vq.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the quantised latents pass the gradient on to the latents (identity except FSQ's tanh bound)
    z = torch.randn(2, vq.config.embed_dim, 4, 4, requires_grad=True)
    vq.quantize(z).quantized.sum().backward()
    if quantizer == "fsq":
        assert (z.grad > 0).all()
    else:
        torch.testing.assert_close(z.grad, torch.ones_like(z))


@pytest.mark.parametrize("quantizer", ["fsq", "lfq", "simvq"])
def test_usage_recovers_from_a_collapsed_start(quantizer):
    # Deliberately bad init: a linear "encoder" with ~0 weights puts every latent in one code.
    # A linear autoencoder trained through the quantizer must spread the codes (plain VQ would not:
    # only its one picked code ever moves; its cure, dead-code restart, is tested in test_quantizer).
    torch.manual_seed(0)
    q = build_quantizer(tiny(quantizer).config).train()
    d = q.dim
    x = torch.randn(512, 16)
    enc, dec = torch.nn.Linear(16, d), torch.nn.Linear(d, 16)
    with torch.no_grad():
        enc.weight.mul_(1e-3)
        enc.bias.fill_(0.01)  # clear of FSQ's and LFQ's boundaries at 0
    params = [*enc.parameters(), *dec.parameters(), *q.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def step():
        z = enc(x).t().reshape(1, d, 1, -1)  # [1, d, 1, N]
        out = q(z)
        rec = dec(out.quantized.reshape(d, -1).t())
        opt.zero_grad()
        (F.mse_loss(rec, x) + out.loss).backward()
        opt.step()
        return out

    first = step()
    assert first.codes.unique().numel() == 1
    for _ in range(300):
        out = step()
    assert out.codes.unique().numel() >= 0.5 * q.codebook_size, out.codes.unique().numel()
    assert out.perplexity > 16


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_save_load_gives_identical_codes(quantizer, tmp_path):
    vq = tiny(quantizer).train()
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    out = vq(pixels())
    (out.reconstruction.abs().mean() + out.quant_loss).backward()
    opt.step()  # SimVQ's map moves: a fresh model would give other codes
    vq.eval()
    vq.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    if quantizer == "simvq":
        assert {"quantize.frozen_codebook", "quantize.transform.weight"} <= set(saved)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is VQGAN and loaded.config.quantizer == quantizer
    for key, value in vq.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = pixels(b=3, seed=5)
    assert torch.equal(loaded.encode(x), vq.encode(x))
    torch.testing.assert_close(loaded.code_vectors(), vq.code_vectors())
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in half.quantize.state_dict().values() if t.is_floating_point())
    assert half.decode(half.encode(x)).shape == x.shape


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_add_image_tokens_with_its_codebook_size(quantizer, text_tokenizer):
    from unimodal.offline import build_causal_lm

    vq = tiny(quantizer)
    model = build_causal_lm("llama", vocab_size=len(text_tokenizer))
    n_text = len(text_tokenizer)
    processor = add_image_tokens(model, text_tokenizer, vq, image_rows_init="codebook")
    lo, hi = processor.image_token_range
    assert hi - lo == vq.codebook_size == SETTINGS[quantizer]["codebook_size"]
    assert len(text_tokenizer) == n_text + vq.codebook_size + 2  # <boi>, <eoi> and one token per code
    assert model.get_input_embeddings().weight.shape[0] >= len(text_tokenizer)
    rows = model.get_input_embeddings().weight[lo:hi]
    assert torch.isfinite(rows).all() and torch.unique(rows, dim=0).shape[0] == vq.codebook_size


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_quantizer_stays_fp32_under_bf16_autocast(quantizer):
    vq = tiny(quantizer).train()
    x = pixels()
    latents = vq.encode_latents(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = vq.quant_conv(vq.encoder(x))
        assert z.dtype == torch.bfloat16
        out = vq.quantize(z)
        table = vq.code_vectors()
    assert out.loss.dtype == out.commitment_loss.dtype == out.perplexity.dtype == torch.float32
    assert out.quantized.dtype == torch.bfloat16 and table.dtype == torch.float32
    # the codes are those of the bf16 latents looked up in fp32 (no bf16 rounding of the distances)
    assert torch.equal(out.codes, vq.quantize.lookup(z.float()))
    assert torch.equal(vq.quantize.lookup(latents), vq.encode(x))


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="set codebook_size=15360 and embed_dim=5"):
        VQGANConfig(quantizer="fsq", fsq_levels=[8, 8, 8, 6, 5], codebook_size=16384, embed_dim=8)
    with pytest.raises(ValueError, match="needs fsq_levels"):
        VQGANConfig(quantizer="fsq", codebook_size=1000, embed_dim=4)
    with pytest.raises(ValueError, match=r"codebook_size=16384 and embed_dim=14"):
        VQGANConfig(quantizer="lfq", codebook_size=16000, embed_dim=8)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        VQGANConfig(quantizer="ibq")


# ----------------------------------------------------------------------------- reference parity


def test_fsq_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    for levels in ([8, 5, 5, 5], [8, 8, 8, 6, 5], [8, 8, 8, 5, 5, 5]):
        ref, ours = vqp.FSQ(levels), FSQuantizer(levels)
        z = torch.randn(4, len(levels), 8, 8, generator=torch.Generator().manual_seed(0)) * 2
        quantized, codes = ref(z)
        out = ours(z)
        assert torch.equal(out.codes, codes.long()) and torch.equal(ours.lookup(z), out.codes)
        torch.testing.assert_close(out.quantized, quantized)
        torch.testing.assert_close(ours.codebook(), ref.implicit_codebook)


def test_lfq_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ref, ours = vqp.LFQ(codebook_size=256, dim=8).train(), LookupFreeQuantizer(256, inv_temperature=2.0)
    z = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    (quantized, codes, _), parts = ref(z, inv_temperature=2.0, return_loss_breakdown=True)
    out = ours(z)
    assert torch.equal(out.codes, codes) and torch.equal(ours.lookup(z), codes)
    torch.testing.assert_close(out.quantized, quantized)
    torch.testing.assert_close(ours.codebook(), ref.codebook)
    per_token, codebook = ours.entropies(ours.flatten(z))
    torch.testing.assert_close(per_token, parts.per_sample_entropy, rtol=1e-4, atol=1e-5)  # exact factorisation
    torch.testing.assert_close(codebook, parts.batch_entropy, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 7, 10])
def test_lfq_codebook_entropy_is_exact_where_the_bits_are_correlated(bits):
    # Every latent's bits equal (two codes, all-0 and all-1), each bit balanced over the batch: the
    # bits' marginals would read bits * ln 2, the batch uses two codes. The reference is the mean
    # softmax over all 2^bits codes, which is what the library computes.
    q = LookupFreeQuantizer(2**bits, inv_temperature=2.0)
    sign = torch.tensor([1.0, -1.0]).repeat(32).unsqueeze(1)  # [64, 1]
    flat = sign * (0.3 + torch.rand(64, bits, generator=torch.Generator().manual_seed(bits)))  # [64, bits]
    mean = (2 * q.inv_temperature * flat @ q.codebook().t()).softmax(-1).mean(0)  # [K]
    reference = -(mean * mean.clamp(min=1e-5).log()).sum()
    _, codebook = q.entropies(flat)
    torch.testing.assert_close(codebook, reference, rtol=1e-5, atol=1e-6)
    if bits > 1:  # the bits' marginals are balanced: a bound from them would read ~bits * ln 2
        assert codebook < 0.5 * bits * math.log(2)


def test_simvq_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ours = SimVQuantizer(512, 8)
    ref = vqp.SimVQ(dim=8, codebook_size=512, channel_first=True, rotation_trick=False,
                    input_to_quantize_commit_loss_weight=0.25)
    with torch.no_grad():
        ref.frozen_codebook.copy_(ours.frozen_codebook)
        ref.code_transform.weight.copy_(ours.transform.weight)
    z = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    quantized, codes, loss = ref(z)
    out = ours(z)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.quantized, quantized)
    torch.testing.assert_close(out.loss, loss)  # ||sg[z] - e||^2 + 0.25 ||z - sg[e]||^2 both


# ----------------------------------------------------------------------------- 2-process sync


def _sync_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        state = {}
        for name in ("fsq", "lfq", "simvq"):
            torch.manual_seed(0)  # the same SimVQ codebook on both ranks (DDP would broadcast it)
            q = build_quantizer(tiny(name).config).train()
            torch.manual_seed(100 + rank)  # different latents on each rank
            for _ in range(3):
                out = q(torch.randn(2, q.dim, 4, 4) + rank)
            state.update({f"{name}.recent_picks": q.recent_picks.clone(), f"{name}.clock": q.clock.clone(),
                          f"{name}.perplexity": out.perplexity, f"{name}.usage": out.usage,
                          f"{name}.codes": out.codes})
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_usage_and_perplexity_are_synchronised_across_two_processes(tmp_path):
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_sync_worker, args=args, nprocs=2, join=True, start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in ("fsq", "lfq", "simvq"):
        assert not torch.equal(r0[f"{name}.codes"], r1[f"{name}.codes"]), "ranks must see different data"
        for key in ("recent_picks", "clock", "perplexity", "usage"):
            assert torch.equal(r0[f"{name}.{key}"], r1[f"{name}.{key}"]), (name, key)
        # the clock counts both ranks' 32 latents of each of the 3 batches
        assert int(r0[f"{name}.clock"]) == 3 * 2 * 32


# ----------------------------------------------------------------------------- the recipe


def test_tokenizer_recipe_trains_an_fsq_tokenizer(tmp_path):
    from unimodal.recipes import train_tokenizer

    out = tmp_path / "fsq"
    train_tokenizer.main(["--config", str(ROOT / "recipes" / "configs" / "train_tokenizer_tiny.yaml"),
                          "--report_to", "none", "--output_dir", str(out), "--model.quantizer", "fsq",
                          "--model.fsq_levels", "4", "4", "4", "--model.codebook_size", "64",
                          "--model.embed_dim", "3"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 4 and 0 < results["codebook_usage"] <= 1
    vq = VQGAN.from_pretrained(out / "final")
    assert vq.config.quantizer == "fsq" and vq.config.fsq_levels == [4, 4, 4] and vq.codebook_size == 64
    x = pixels()
    assert vq.decode(vq.encode(x)).shape == x.shape
