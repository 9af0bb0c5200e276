"""VectorQuantizer: lookup, losses, straight-through, EMA, k-means, dead-code restart, fp32, sync."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unimodal.vq.quantizer import VectorQuantizer, kmeans, nearest_code


def latents(b=4, d=4, h=4, w=4, seed=0):
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


def test_nearest_code_matches_brute_force_also_in_chunks():
    z, e = torch.randn(100, 6), torch.randn(17, 6)
    expected = torch.cdist(z.double(), e.double()).argmin(1)
    assert torch.equal(nearest_code(z, e), expected)
    assert torch.equal(nearest_code(z, e, chunk=7), expected)


def test_forward_shapes_losses_and_straight_through():
    vq = VectorQuantizer(16, 4, beta=0.25)
    z = latents().requires_grad_()
    out = vq(z)
    assert out.quantized.shape == z.shape and out.codes.shape == (4, 4, 4)
    # the forward value is the nearest code, and `lookup` (inference path) agrees
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    codes = torch.cdist(flat, vq.embedding.weight).argmin(1)
    assert torch.equal(out.codes.flatten(), codes)
    assert torch.equal(vq.lookup(z), out.codes)
    zq = vq.embedding.weight[codes].view(4, 4, 4, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized, zq)
    # codebook + beta * commitment, both ||z - e||^2
    mse = F.mse_loss(flat, vq.embedding.weight[codes])
    torch.testing.assert_close(out.codebook_loss, mse)
    torch.testing.assert_close(out.commitment_loss, mse)
    torch.testing.assert_close(out.loss, 1.25 * mse)
    # straight-through: d(sum quantized)/dz is exactly the identity
    (out.quantized.sum()).backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_codebook_loss_moves_the_chosen_codes_towards_their_latents():
    vq = VectorQuantizer(16, 4)
    z = latents()
    out = vq(z)
    before = vq.embedding.weight.detach().clone()
    opt = torch.optim.SGD(vq.parameters(), lr=1.0)
    out.codebook_loss.backward()
    opt.step()
    used = out.codes.unique()
    unused = torch.ones(16, dtype=torch.bool)
    unused[used] = False
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for k in used:
        target = flat[out.codes.flatten() == k].mean(0)
        assert (vq.embedding.weight[k] - target).norm() < (before[k] - target).norm()
    assert torch.equal(vq.embedding.weight[unused], before[unused])


def test_ema_updates_move_codes_without_gradients():
    vq = VectorQuantizer(16, 4, ema_decay=0.5)
    assert not vq.embedding.weight.requires_grad
    z = latents()
    before = vq.embedding.weight.clone()
    vq.eval()
    vq(z)
    assert torch.equal(vq.embedding.weight, before), "eval mode must not update the codebook"
    vq.train()
    out = vq(z)
    assert out.codebook_loss == 0 and out.loss > 0
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    used = out.codes.unique()
    for k in used:
        target = flat[out.codes.flatten() == k].mean(0)
        assert (vq.embedding.weight[k] - target).norm() < 0.9 * (before[k] - target).norm()
    unused = torch.ones(16, dtype=torch.bool)
    unused[used] = False
    torch.testing.assert_close(vq.embedding.weight[unused], before[unused], atol=1e-3, rtol=1e-3)


def test_kmeans_init_places_codes_on_the_clusters_once():
    centres = torch.tensor([[4.0, 0, 0], [-4, 0, 0], [0, 4, 0], [0, -4, 0], [0, 0, 4], [0, 0, -4]])
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 6, (2, 8, 8), generator=g)
    z = (centres[idx] + 0.05 * torch.randn(2, 8, 8, 3, generator=g)).permute(0, 3, 1, 2)
    vq = VectorQuantizer(6, 3, kmeans_init=True, kmeans_iters=20)
    torch.manual_seed(0)
    vq(z)
    assert vq.initted
    assert torch.cdist(centres, vq.embedding.weight).min(1).values.max() < 0.1
    after_init = vq.embedding.weight.detach().clone()
    vq(z + 1.0)  # a second batch does not re-run k-means
    assert torch.equal(vq.embedding.weight, after_init)


def test_spherical_kmeans_returns_unit_centres_on_the_directions():
    directions = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    scales = torch.rand(200, 1, generator=torch.Generator().manual_seed(4)) + 0.5
    x = F.normalize(directions.repeat(50, 1) * scales, dim=1)
    found = kmeans(x, 4, iters=5, cosine=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(found.norm(dim=1), torch.ones(4))
    assert torch.cdist(directions, found).min(1).values.max() < 1e-4


@pytest.mark.parametrize("window", [{}, {"usage_window": 2}], ids=["latents-per-code", "batches"])
def test_dead_code_restart_raises_usage_on_a_collapsed_codebook(window):
    def run(threshold):
        torch.manual_seed(0)
        vq = VectorQuantizer(32, 4, dead_code_threshold=threshold, **window)  # default: 4 * 32 latents = 2 batches
        with torch.no_grad():
            vq.embedding.weight.fill_(10.0)  # every code identical and far away: all latents pick code 0
        for step in range(12):
            out = vq(latents(seed=step))
        return out.usage.item(), out.perplexity.item()

    usage_plain, ppl_plain = run(0)
    usage_restart, ppl_restart = run(1)
    assert usage_plain == 1 / 32 and ppl_plain == pytest.approx(1.0)
    assert usage_restart > 0.5 and ppl_restart > 8


def test_restarted_codes_are_encoder_outputs_and_wait_a_window():
    vq = VectorQuantizer(8, 4, dead_code_threshold=1, usage_window=3)
    z = latents(b=1)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for _ in range(2):
        vq(z)
    assert torch.equal(vq.restarted_at, torch.zeros(8, dtype=torch.long)), "no restart before a full window"
    vq(z)
    restarted = vq.restarted_at == 3
    assert restarted.any()
    for e in vq.embedding.weight[restarted]:
        assert torch.isclose(flat, e).all(1).any(), "a restarted code is one of the batch's latents"


def test_restart_window_scales_with_the_codebook_size():
    # 1024 codes picked in turn, 8 a batch: each code once per 128 batches, i.e. once per K latents,
    # as often as any other. A window of 100 batches (the old VQGANConfig default; the shipped
    # configs had 20) calls such codes dead and restarts them; the default window of 4 latents
    # per code (4 picks each) restarts none.
    def run(**window):
        torch.manual_seed(0)
        vq = VectorQuantizer(1024, 4, dead_code_threshold=1, **window)
        for step in range(1100):
            codes = torch.arange(1024)[(step * 8) % 1024:][:8]
            vq(vq.embedding.weight[codes].detach().t().reshape(1, 4, 1, 8).clone())
        return vq

    assert (run(usage_window=100).restarted_at > 0).any(), "the old batch window restarts codes in regular use"
    vq = run()
    assert vq.window == 4 * 1024 and int(vq.clock) == 1100 * 8
    assert not (vq.restarted_at > 0).any() and vq.usage.item() == 1.0


def test_window_counts_latents_not_batches():
    vq = VectorQuantizer(8, 2, usage_tokens_per_code=1)  # the last 8 latents, however batched
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.arange(16.0).view(8, 2))

    def batch_of(codes):  # latents equal to the given codes -> [1, 2, 1, n]
        return vq.embedding.weight[torch.tensor(codes)].t().reshape(1, 2, 1, -1).clone()

    # whole batches: one is in the window while it ended fewer than 8 latents ago
    assert vq(batch_of([0, 1])).usage.item() == 2 / 8
    assert vq(batch_of([2, 3, 4, 5, 6, 7])).usage.item() == 1.0
    assert vq(batch_of([0, 0, 0, 0, 0, 0])).usage.item() == 7 / 8  # [0, 1] ended 12 latents ago, [2..7] 6
    assert vq(batch_of([0, 0])).usage.item() == 1 / 8  # [2..7] ended 8 latents ago


def _old_batch_window_rule(counts: list[torch.Tensor], window: int, threshold: int) -> list[torch.Tensor]:
    """The rule before usage_tokens_per_code: [window, K] histogram, restart if its sum < threshold."""
    ring, restarted_at, dead_per_step = torch.zeros(window, counts[0].numel()), torch.zeros(counts[0].numel()), []
    for step, c in enumerate(counts, 1):
        ring[(step - 1) % window] = c
        dead = (ring.sum(0) < threshold) & (step - restarted_at >= window)
        restarted_at[dead] = step
        dead_per_step.append(dead)
    return dead_per_step


def test_usage_window_in_batches_keeps_the_old_rule_exactly():
    # configs saved with usage_window (batches) restart exactly the codes they restarted before
    vq = VectorQuantizer(16, 2, dead_code_threshold=2, usage_window=3)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 10)
    g = torch.Generator().manual_seed(1)
    counts, dead = [], []
    for _ in range(30):
        # a few codes per batch, some repeated; restarts copy latents, so re-derive codes each batch
        codes = torch.randint(0, 16, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        before = vq.restarted_at.clone()
        out = vq(vq.embedding.weight[codes].detach().t().reshape(1, 2, 1, -1).clone())
        counts.append(torch.bincount(out.codes.flatten(), minlength=16).float())
        dead.append(vq.restarted_at != before)
    for step, (ours, old) in enumerate(zip(dead, _old_batch_window_rule(counts, 3, 2))):
        assert torch.equal(ours, old), step


def test_config_window_settings_and_old_configs(tmp_path):
    from unimodal import VQGAN, VQGANConfig

    tiny = dict(codebook_size=64, image_size=16, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                z_channels=16, num_groups=8, embed_dim=4)
    assert VQGAN(VQGANConfig(**tiny)).quantize.window == 4 * 64  # latents
    VQGAN(VQGANConfig(**tiny, usage_window=20)).save_pretrained(tmp_path)  # as configs were saved before
    old = VQGAN.from_pretrained(tmp_path).quantize
    assert old.window_batches == 20 and old.window == 20  # batches, as it was trained
    with pytest.raises(ValueError, match="usage_tokens_per_code must be > 0"):
        VQGANConfig(**tiny, usage_tokens_per_code=0)
    with pytest.raises(ValueError, match="usage_window"):
        VQGANConfig(**tiny, usage_window=0)


def test_perplexity_and_rolling_usage_are_exact():
    vq = VectorQuantizer(8, 2, usage_window=2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.arange(16.0).view(8, 2))

    def batch_of(codes):  # latents equal to the given codes -> [1, 2, 1, n]
        return vq.embedding.weight[torch.tensor(codes)].t().reshape(1, 2, 1, -1).clone()

    out = vq(batch_of([0, 1, 0, 1]))
    assert out.perplexity.item() == pytest.approx(2.0) and out.usage.item() == 2 / 8
    out = vq(batch_of([2, 3, 4, 5]))
    assert out.perplexity.item() == pytest.approx(4.0) and out.usage.item() == 6 / 8
    out = vq(batch_of([6, 6]))  # batch 1 leaves the window
    assert out.perplexity.item() == pytest.approx(1.0) and out.usage.item() == 5 / 8


def test_l2_normalised_codes():
    vq = VectorQuantizer(16, 4, use_l2_norm=True)
    z = latents() * 3
    out = vq(z)
    assert torch.allclose(vq.codebook().norm(dim=1), torch.ones(16))
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(4, 4, 4))
    # nearest unit code = highest cosine similarity with the raw (unnormalised) weights
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    cos = F.normalize(flat, dim=1) @ F.normalize(vq.embedding.weight, dim=1).t()
    assert torch.equal(out.codes.flatten(), cos.argmax(1))


def test_l2_norm_with_restart_backpropagates():
    # restarts overwrite the weight in place during forward; backward must still work
    torch.manual_seed(0)  # an init that leaves codes unpicked (the result depended on earlier tests)
    vq = VectorQuantizer(16, 4, use_l2_norm=True, dead_code_threshold=1, usage_window=1)
    out = vq(latents())
    assert (vq.restarted_at == 1).any()
    out.loss.backward()
    assert vq.embedding.weight.grad is not None


def test_quantizer_stays_fp32_under_bf16_autocast():
    # Two codes one bf16 step apart; the latent sits on the second. fp32 distances pick code 1,
    # while the same expansion in bf16 cancels to a tie and picks code 0.
    vq = VectorQuantizer(2, 1)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0], [1.0078125]]))
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.full((1, 1, 1, 1), 1.0078125)
    naive_bf16 = nearest_code(x.view(1, 1).bfloat16(), vq.embedding.weight.bfloat16())
    assert naive_bf16.item() == 0, "the test needs a case where bf16 flips the argmin"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = conv(x)
        assert z.dtype == torch.bfloat16
        out = vq(z)
        codes = vq.lookup(z)
    assert out.codes.item() == 1 and codes.item() == 1
    assert out.loss.dtype == out.commitment_loss.dtype == out.perplexity.dtype == torch.float32
    assert out.quantized.dtype == torch.bfloat16  # back in the caller's dtype for the decoder


# ----------------------------------------------------------------------------- 2-process sync


def _sync_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1234 + rank)  # different latents and RNG state on each rank
        # window: 4 latents per code = 64 = 1 step of both ranks' 2 * 32 latents
        vq = VectorQuantizer(16, 3, ema_decay=0.8, kmeans_init=True, kmeans_iters=3, dead_code_threshold=2)
        for _ in range(6):
            z = torch.randn(2, 3, 4, 4) + rank * 3.0
            out = vq(z)
        state = {k: v.clone() for k, v in vq.named_buffers()}
        state["weight"] = vq.embedding.weight.detach().clone()
        state["last_codes"] = out.codes
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_codebook_statistics_stay_identical_across_two_processes(tmp_path):
    # fork: the workers inherit the imported modules (spawn would re-import torch + transformers)
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_sync_worker, args=args, nprocs=2, join=True, start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not torch.equal(r0["last_codes"], r1["last_codes"]), "ranks must see different data"
    for key in ("weight", "ema_cluster_size", "ema_embed_sum", "recent_picks", "restarted_at", "clock", "initted"):
        assert torch.equal(r0[key], r1[key]), key
    # global statistics: both ranks' 32 latents per step are counted
    assert int(r0["clock"]) == 6 * 2 * 32
    assert bool(r0["initted"]) and (r0["restarted_at"] > 0).any()
