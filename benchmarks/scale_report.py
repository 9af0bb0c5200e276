"""benchmarks/scale.py's arithmetic: how long each variant should take (printed before the run, so
a plan can be sized), the one markdown table of the results with the ratios the targets read, and
the memory model of docs/distributed.md (its measured constants, their measurement, its table).

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
    params = s.layers * layer_params(s) + (1 if s.tied else 2) * head_rows(s) * s.hidden
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
        hf = min(args.gen_hf_tokens or steps, steps) * 2 * max(2 * (backbone + head_rows(s) * s.hidden) / rate,
                             4 * (backbone + head_rows(s) * s.hidden) / (MEMORY_GB_PER_S * 1e9))
        return 45 + 3 * ours + hf  # eager, then the compiled step's warm-up (compiling ~30 s) and timed image
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
    method = "full fine-tune, step in backward, no clipping" if method == "inbwd" else f"{method} fine-tune"
    return (f"LM {s.layers} x {s.hidden}, {method}, {'GC' if gc == 'gc' else 'no GC'}, "
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
            if got.get("bf16_peak_flops"):  # GPUs: model FLOPs (full head, no recompute) / bf16 matmul peak
                per_token = step_flops(s, args.batch, "t2i", "model", False, False) / (args.batch * s.sample_tokens)
                speed += f" (MFU {got['tokens_per_s'] * per_token / got['bf16_peak_flops']:.0%})"
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
            short = bool(got) and got["hf_tokens"] < s.grid**2  # --gen_hf_tokens: a shorter context flatters it
            shortened = f", its first {got['hf_tokens']} tokens" if short else ""
            row(name, setting, f"transformers generate CFG{shortened}", "(same process)",
                f"{got['hf_tokens_per_s']:.1f} tokens/s" if got else "-")
            if got and got.get("compile_fallback"):
                system = f"ours, static cache; the compile failed, eager step: {got['compile_fallback'][0]}"
            else:
                system = "ours, static cache + compiled step (CUDA graphs on a GPU, inductor on a CPU)"
            row(name, setting, system, "(same process)",
                f"{got['compiled_tokens_per_s']:.1f} tokens/s" if got else "-",
                f"{_ratio(got['compiled_tokens_per_s'], got['hf_tokens_per_s'])} of generate; warm-up "
                f"{got['compiled_warm_up_s']:.0f} s (compiling {got['compile_seconds']:.0f} s)" if got else "")
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


# ----------------------------------------------------------------------------- the memory guide

# Bytes per token autograd holds after the forward, fp32 on CPU, SDPA attention (no T^2 term):
# `python benchmarks/scale.py --lm <shape> --only act` (2026-12-02). "layer_gc": with gradient
# checkpointing (each layer's input); "head_*": embedding + final norm + head + loss.
MEASURED_ACT = {
    "0.5b": dict(layer=105.1, layer_gc=7.0, head_model=636.8, head_ours=10.8),  # KB per token
    "1.5b": dict(layer=190.1, layer_gc=12.0, head_model=644.8, head_ours=18.6),
    "7b": dict(layer=412.1, layer_gc=28.0, head_model=669.3, head_ours=42.1),
}
STRATEGIES = ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 + offload", "FSDP2")
GB = 2**30  # as peak_memory_gb reports
GPU_OVERHEAD_GB = 1.5  # CUDA context, allocator fragmentation, communication buffers (derived)
CHUNK_LOGITS = 256 * 2**20  # fp32 logits of one chunk of the chunked loss (unimodal.training.loss default)


def lm_params(s, lora_r: int = 16) -> tuple[float, float]:
    """``(all parameters, trainable with LoRA)`` after `add_image_tokens`: layers + head rows (x2
    untied); LoRA r on every linear layer + trainable new rows (PEFT trainable tokens)."""
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    total = s.layers * layer_params(s) + (1 if s.tied else 2) * head_rows(s) * s.hidden
    lora = s.layers * lora_r * (4 * s.hidden + 2 * (s.hidden + kv) + 3 * (s.hidden + s.intermediate))
    new_rows = (s.codes + 2) * s.hidden * (1 if s.tied else 2)
    return total, lora + new_rows


def state_gb(s, lora: bool, strategy: str, n: int) -> tuple[float, float]:
    """``(GB per GPU, GB of CPU RAM per machine)`` for weights, gradients and AdamW state with
    bf16 mixed precision. Full fine-tuning, per trainable parameter: DDP (accelerate: fp32 weights
    4 + fp32 grads 4 + DDP's gradient buckets 4 + Adam m, v 8) 20 B; DeepSpeed (bf16 weights 2 +
    bf16 grads 2 + fp32 master 4 + Adam 8) 16 B, ZeRO-2 keeping the 2 B of weights whole and
    sharding the rest, ZeRO-3 sharding all; FSDP2 (fp32 shards 4 + grads 4 + Adam 8) 16 B / N.
    LoRA: frozen weights in bf16 (``dtype: bfloat16``), 2 B each, sharded by ZeRO-3 / FSDP2.
    ZeRO-3 and FSDP2 also hold the largest module they gather (the embedding rows), in bf16."""
    total, trainable = lm_params(s)
    frozen, train = (total, trainable) if lora else (0.0, total)
    live = 2 * max(head_rows(s) * s.hidden, layer_params(s))
    if strategy == "DDP":
        gpu = 2 * frozen + 20 * train
    elif strategy == "ZeRO-2":
        gpu = 2 * frozen + 2 * train + 14 * train / n
    elif strategy in ("ZeRO-3", "FSDP2"):
        gpu = (2 * frozen + 16 * train) / n + live
    else:  # ZeRO-3 + offload: parameters and optimizer in CPU RAM, the gathered working set on the GPU
        return live / GB, (2 * frozen + 16 * train) / GB
    return gpu / GB, 0.0


def activations_gb(act: dict, s, tokens: int, batch: int, gc: bool, chunked: bool, bf16: bool = True,
                   mlp_chunk: int = 0) -> float:
    """Peak activation memory of a step: what the forward keeps (the measured constants, KB per
    token) + in backward one layer recomputed (GC) and one layer of activation gradients; with
    ``mlp_chunk`` (the recipe's ``mlp_chunk_size``, GC only) the recomputed MLP's four
    [tokens, intermediate] tensors and their gradients exist for that many tokens only. The
    model's loss peaks at ~3 fp32 logits-sized buffers (logits or log-softmax, their gradient, the
    upcast), ours at one chunk's (x3). bf16: the fp32 measurement halved (derived)."""
    scale = 0.5 if bf16 else 1.0
    per = 1024 * batch * tokens * scale  # KB per token -> bytes
    kept = s.layers * (act["layer_gc"] if gc else act["layer"]) * per
    backward = act["layer"] * per * (2 if gc else 1)
    if gc and mlp_chunk:
        mlp_bytes_per_token = 4 * s.intermediate * 4 * scale  # gate, up, activation, product
        backward -= 2 * mlp_bytes_per_token * max(0, batch * tokens - mlp_chunk)
    if chunked:
        loss = act["head_ours"] * 1024 * batch * tokens + 3 * CHUNK_LOGITS
    else:
        loss = 3 * 4 * head_rows(s) * batch * tokens
    return (kept + backward + loss) / GB


def run_activations(args, shape) -> dict:
    """Bytes per token that autograd holds for backward once the forward is done (saved tensors,
    parameters excluded, each storage once) at this shape on one sample: one decoder layer without
    and with gradient checkpointing, and the embedding + head + loss with the model's own loss and
    with ours at t2i / i2t targets. From the same random LM run with 2 and with 1 layer; the
    constants of docs/distributed.md's memory formula."""
    import torch
    from common import peak_memory_gb

    from unimodal.offline import build_causal_lm
    from unimodal.training.loss import batch_loss

    rows, length = head_rows(shape), shape.sample_tokens
    model = build_causal_lm("qwen2", vocab_size=rows, hidden_size=shape.hidden, num_layers=2, num_heads=shape.heads,
                            num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                            max_position_embeddings=2048, tie_word_embeddings=shape.tied).train()
    all_layers = model.model.layers
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, rows, (1, length))
    # t2i targets: the image and <eoi>; i2t: the caption and <eos> (the sample's last tokens)
    spans = {"t2i": slice(length - shape.grid**2 - 2, length - 1),
             "i2t": slice(length - shape.caption_tokens - 1, None)}

    def held(layers: int, gc: bool, method: str, task: str) -> float:
        model.model.layers, model.config.num_hidden_layers = all_layers[:layers], layers
        if gc:  # (checkpointing keeps each layer's input outside these hooks: hidden x 4 B, added below)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        labels = torch.full_like(ids, -100)
        labels[0, spans[task]] = ids[0, spans[task]]
        kept = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch_loss(model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}, method)
        return sum(kept.values()) / length

    one, two = held(1, False, "model", "t2i"), held(2, False, "model", "t2i")
    layer = two - one
    layer_gc = held(2, True, "model", "t2i") - held(1, True, "model", "t2i") + 4 * shape.hidden
    return {"layer_bytes_per_token": layer, "layer_gc_bytes_per_token": layer_gc,
            "head_model_bytes_per_token": one - layer,
            "head_ours_t2i_bytes_per_token": held(1, False, "chunked", "t2i") - layer,
            "head_ours_i2t_bytes_per_token": held(1, False, "chunked", "i2t") - layer,
            "tokens": length, "head_rows": rows, "peak_gb": peak_memory_gb()}


def memory_guide(shapes: dict, n: int = 8, batch: int = 4) -> str:
    """docs/distributed.md's derived table: GB per GPU with n GPUs, ``batch`` samples per GPU,
    bf16, gradient checkpointing and our chunked loss unless a column says otherwise."""
    from unimodal.training.mlp_chunks import MLP_CHUNK_SIZE  # the recipe's mlp_chunk_size default

    lines = ["| LM | fine-tune | strategy | 256 image tokens | 1024 | 1024, no GC | 1024, model's loss | "
             "smallest GPU, 1024 | CPU RAM |", "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, s in shapes.items():
        act = MEASURED_ACT[name]
        for lora in (False, True):
            for strategy in STRATEGIES:
                gpu, cpu = state_gb(s, lora, strategy, n)
                columns = ((256, True, True), (1024, True, True), (1024, False, True), (1024, True, False))
                # ZeRO-3 keeps the MLPs' plain backward (unimodal.training.mlp_chunks)
                mlp_chunk = 0 if strategy.startswith("ZeRO-3") else MLP_CHUNK_SIZE
                cells = [gpu + GPU_OVERHEAD_GB + activations_gb(act, s, image + s.caption_tokens + 4, batch, gc, ours,
                                                                mlp_chunk=mlp_chunk)
                         for image, gc, ours in columns]
                fits = next((f"{g} GB" for g in (24, 48, 80) if cells[1] <= 0.95 * g), "> 80 GB")
                lines.append(f"| {name.upper()} | {'LoRA r=16' if lora else 'full'} | {strategy} | "
                             + " | ".join(f"{c:.1f}" for c in cells) + f" | {fits} | {f'{cpu:.0f}' if cpu else '-'} |")
    return "\n".join(lines)
