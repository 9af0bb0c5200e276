"""benchmarks/scale.py's arithmetic: how long each variant should take (printed before the run, so
a plan can be sized), and the one markdown table of the results with the ratios the targets read.

The estimate counts matmul FLOPs (forward = 2 x parameters x tokens; a training step 3 forwards, 2
with LoRA, +1 with gradient checkpointing; the LM head only over the positions a loss is taken at
for ``ours``, plus the chunk it recomputes in backward) at a fraction of the machine's measured fp32
matmul rate, plus fixed costs per process (start, loading and saving the weights, one eval sample).
"""

from __future__ import annotations

SYSTEMS = {"ours": "recipe, chunked loss", "model": "recipe, model's own loss", "trl": "TRL SFTTrainer"}
TRAIN_EFFICIENCY = 0.55  # share of the 1024^3 matmul rate a training step reaches (2-core EPYC, 2 threads)
CONV_EFFICIENCY = 0.5
MEMORY_GB_PER_S = 8.0  # weights streamed per decode step
VQGAN_GFLOP_512 = (552, 1002)  # Chameleon's VQ-GAN, encode / decode of one 512-px image (FlopCounterMode)


def layer_params(s) -> int:
    """Linear parameters of one decoder layer: q and o (h x h), k and v (h x kv x head_dim), gate/up/down."""
    head_dim = s.hidden // s.heads
    return 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head_dim + 3 * s.hidden * s.intermediate


def head_rows(s) -> int:
    """Rows after `add_image_tokens`: text + <boi>/<eoi> + codes, rounded up to 64."""
    return -(-(s.text_rows + 2 + s.codes) // 64) * 64


def step_flops(s, batch: int, task: str, system: str, lora: bool, gc: bool) -> float:
    tokens = batch * s.sample_tokens
    passes = (2 if lora else 3) + (1 if gc else 0)
    per_token = s.layers * (2 * layer_params(s) + 2 * s.hidden * s.sample_tokens)  # + causal attention
    targets = s.grid**2 + 1 if task == "t2i" else s.caption_tokens + 1
    positions = batch * targets if system == "ours" else tokens
    head = 2 * head_rows(s) * s.hidden * positions * ((2 if lora else 3) + (system == "ours"))
    return per_token * tokens * passes + head


def process_overhead_s(s) -> float:
    """Start and imports, load the weights, one held-out forward per task, save the final weights."""
    params = s.layers * layer_params(s) + head_rows(s) * s.hidden
    return 15 + params * 4 / 0.5e9 + params * 4 / 0.3e9


def estimate_seconds(name: str, s, args, rate: float) -> float:
    """Expected wall seconds of one variant at ``rate`` FLOP/s (the measured matmul rate)."""
    kind, *rest = name.split("-")
    train_rate = rate * TRAIN_EFFICIENCY
    if kind == "vq":
        batch, side = int(rest[0][1:]), s.vqgan["ddconfig"]["resolution"]
        return 10 + batch * sum(VQGAN_GFLOP_512) * 1e9 * (side / 512) ** 2 / (rate * CONV_EFFICIENCY)
    if kind == "lm":
        flops = step_flops(s, args.batch, rest[2], rest[3], rest[0] == "lora", rest[1] == "gc")
        return process_overhead_s(s) + args.steps * flops / train_rate
    if kind == "gen":
        backbone = s.layers * layer_params(s)
        steps = s.grid**2
        ours = steps * max(2 * 2 * backbone / rate, 4 * backbone / (MEMORY_GB_PER_S * 1e9))
        hf = steps * 2 * max(2 * (backbone + head_rows(s) * s.hidden) / rate,
                             4 * (backbone + head_rows(s) * s.hidden) / (MEMORY_GB_PER_S * 1e9))
        return 15 + ours + hf
    if kind == "act":  # six forwards of a 1-2 layer model on one sample
        return 20 + 6 * 2 * (2 * layer_params(s) + head_rows(s) * s.hidden) * s.sample_tokens / train_rate
    flops = step_flops(s, args.dist_batch, "i2t", "ours", False, True)
    processes = 1 if rest[0] == "single" else 2  # two processes share the cores
    return process_overhead_s(s) * processes + args.steps * flops * processes / train_rate


# ----------------------------------------------------------------------------- the table

def _peak(run) -> float:
    return max([r.get("peak_gb", 0.0) for r in run.results] or [0.0])


def _lm_setting(name: str, s, args) -> str:
    _, method, gc, task, _ = name.split("-")
    loss = "image loss" if task == "t2i" else "caption loss only"
    return (f"LM {s.layers} x {s.hidden}, {method} fine-tune, {'GC' if gc == 'gc' else 'no GC'}, "
            f"{task} ({loss}), {args.batch} x {s.sample_tokens} tokens")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render_table(runs: dict, s, args, limit_gb: float) -> str:
    """One markdown table: every variant that ran, its peak memory and speed, and the ratios."""
    lines = ["| variant | setting | system | peak memory | speed | ratio |", "| --- | --- | --- | ---: | ---: | --- |"]

    def row(name, setting, system, peak, speed, ratio=""):
        lines.append(f"| {name} | {setting} | {system} | {peak} | {speed} | {ratio} |")

    def ok(run):
        return run.error is None and run.results

    for name, run in runs.items():
        kind = name.split("-")[0]
        peak = f"{_peak(run):.2f} GB" if ok(run) else (run.error or "no result")
        got = run.results[0] if ok(run) else {}
        if kind == "vq":
            side = s.vqgan["ddconfig"]["resolution"]
            speed = (f"{got['encode_images_per_s']:.3f} / {got['decode_images_per_s']:.3f} images/s" if got else "-")
            row(name, f"Chameleon VQ-GAN, {side} px -> {s.grid}x{s.grid} codes, batch {name[4:]}",
                "encode / decode", peak, speed)
        elif kind == "lm":
            system = name.rsplit("-", 1)[1]
            speed = f"{got['tokens_per_s']:.1f} tokens/s" if got else "-"
            ratio = ""
            if system == "ours" and got:
                ref = runs.get(name[: -len("ours")] + "model")
                trl = runs.get(name[: -len("ours")] + "trl")
                parts = []
                if ref is not None and ok(ref):
                    parts.append(f"memory {_ratio(_peak(run), _peak(ref))}, speed "
                                 f"{_ratio(got['tokens_per_s'], ref.results[0]['tokens_per_s'])} of model loss")
                elif ref is not None:
                    parts.append(f"model loss: {ref.error}")
                if trl is not None and ok(trl):
                    parts.append(f"speed {_ratio(got['tokens_per_s'], trl.results[0]['tokens_per_s'])} of TRL")
                ratio = "; ".join(parts)
            row(name, _lm_setting(name, s, args), SYSTEMS[system], peak, speed, ratio)
        elif kind == "gen":
            setting = f"one {s.grid**2}-token image, CFG 7 (Liquid's sampling), batch 1, {s.layers} layers"
            row(name, setting, "ours (one batched forward, one KV cache)", peak,
                f"{got['ours_tokens_per_s']:.1f} tokens/s" if got else "-",
                f"{_ratio(got.get('ours_tokens_per_s'), got.get('hf_tokens_per_s'))} of generate" if got else "")
            row(name, setting, "transformers generate CFG", "(same process)",
                f"{got['hf_tokens_per_s']:.1f} tokens/s" if got else "-")
        elif kind == "act":
            kb = {k: f"{v / 1024:.1f} KB" for k, v in got.items() if k.endswith("bytes_per_token")}
            speed = (f"layer {kb['layer_bytes_per_token']} (GC {kb['layer_gc_bytes_per_token']}); head + loss: "
                     f"model {kb['head_model_bytes_per_token']}, ours t2i {kb['head_ours_t2i_bytes_per_token']}, "
                     f"i2t {kb['head_ours_i2t_bytes_per_token']}") if got else "-"
            row(name, f"activations autograd holds per token after the forward, 1 x {s.sample_tokens} tokens",
                "saved tensors", peak, speed)
        else:
            mode = name.split("-", 1)[1]
            per_rank = ", ".join(f"{r['peak_gb']:.2f}" for r in sorted(run.results, key=lambda r: r["rank"]))
            peak = f"{per_rank} GB" if ok(run) else peak
            single = runs.get("dist-single")
            ratio = (f"max {_ratio(_peak(run), _peak(single))} of 1 process" if mode != "single" and ok(run)
                     and single is not None and ok(single) else "")
            speed = f"{sum(r['tokens_per_s'] for r in run.results[:1]):.1f} tokens/s" if ok(run) else "-"
            row(name, f"full fine-tune, GC, i2t, {args.dist_batch} x {s.sample_tokens} tokens per process",
                {"single": "1 process", "zero3": "DeepSpeed ZeRO-3, 2 processes", "ddp": "DDP, 2 processes",
                 "zero2": "DeepSpeed ZeRO-2, 2 processes"}[mode], peak, speed, ratio)
    return "\n".join(lines)
