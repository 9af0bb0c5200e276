"""Real scale (issue #13): Liquid-sized shapes with random weights, every variant in its own process.

    python benchmarks/scale.py --out docs/scale_table.md     # the default plan (estimate printed first)
    python benchmarks/scale.py --quick                       # tiny shapes, the same rows: a smoke test
    python benchmarks/scale.py --only 'lm-lora-*' --layers 4 --batch 2 --steps 3
    python benchmarks/scale.py --list                        # every variant name, the default plan marked

Variants (``--only`` takes names or shell patterns):

- ``vq-b<N>``: Chameleon's VQ-GAN (the architecture `unimodal.vq.convert.from_taming` reads from
  Chameleon's ``vqgan.yaml``: 8192 codes, 512 px -> 32 x 32 = 1024 tokens), encode + decode of a
  batch of N random 512-px images: images/s and peak memory.
- ``lm-<full|lora|inbwd>-<gc|nogc>-<t2i|i2t>-<system>``: a Qwen2.5-0.5B-shaped LM (hidden 896, 24 layers,
  14 heads / 2 KV heads, MLP 4864, 151,936 tied text rows) extended with 8192 image codes, trained on
  1,100-token samples (t2i: image loss; i2t: caption loss only) for ``--steps`` optimizer steps of
  ``--batch`` samples; the first step is warm-up, trained (non-pad) tokens/s count the others.
  ``ours``: the finetune recipe with its chunked loss (``loss: chunked``); ``model``: the same
  recipe with the model's own loss (``loss: model``); ``trl``: TRL's SFTTrainer on the same samples
  and loss mask. ``inbwd``: full fine-tune with the optimizer step inside backward
  (``optimizer_in_backward: true``, which needs ``max_grad_norm: 0``; the other modes clip at 1.0).
- ``gen``: one 1024-token image with CFG (Liquid's settings) at that shape: ours
  (`benchmarks/generate.py` ``run_ours``) vs transformers' ``generate`` CFG (``run_hf``), and ours
  with the static cache and compiled step (CUDA graphs on a GPU; its warm-up reported apart).
- ``dist-<single|zero3|ddp|zero2>``: peak memory per process of the recipe at ``--dist_batch``
  samples, 1 process vs 2-process DeepSpeed ZeRO-3 (and DDP / ZeRO-2) over gloo.

Each child's peak is its own maximum resident set (``ru_maxrss``; GPU: max allocated). The parent
samples the memory (PSS: shared pages once) of the child's whole process tree and kills it above
``--memory_limit_gb`` (default: what the machine has free at the start less 1.5 GB): that row then
reads "did not fit in N GB" and the run goes on.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import torch
from common import REPO, RESULT, bench_env, cpu_name, matmul_peak, memory_available_gb, peak_memory_gb, run_child
from scale_report import SYSTEMS, estimate_seconds, memory_guide, render_table, run_activations

LAUNCH_CONFIGS = REPO / "recipes" / "configs" / "accelerate"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Chameleon's tokenizer/vqgan.yaml (model.params): taming's VQModel, no attention in the down/up
# levels (attn_resolutions: []), attention in the middle blocks.
CHAMELEON_VQGAN = {"embed_dim": 256, "n_embed": 8192, "ddconfig": {
    "double_z": False, "z_channels": 256, "resolution": 512, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}
TINY_VQGAN = {"embed_dim": 8, "n_embed": 64, "ddconfig": {**CHAMELEON_VQGAN["ddconfig"], "z_channels": 8,
                                                           "resolution": 32, "ch": 32, "ch_mult": [1, 2]}}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    text_rows: int  # LM rows before image tokens (the text tokenizer is padded to this)
    codes: int  # image codes appended to the vocabulary
    grid: int  # grid x grid image tokens per image
    caption_tokens: int  # sample length = caption + grid^2 + 4 control tokens
    vqgan: dict
    tied: bool = True  # one matrix for input embedding and head

    @property
    def sample_tokens(self) -> int:
        return self.caption_tokens + self.grid**2 + 4


# Qwen2.5 shapes (their config.json) + Chameleon's 8192 codes at 32 x 32; --lm picks one.
LMS = {"0.5b": Shape(896, 24, 14, 2, 4864, 151_936, 8192, 32, 72, CHAMELEON_VQGAN),
       "1.5b": Shape(1536, 28, 12, 2, 8960, 151_936, 8192, 32, 72, CHAMELEON_VQGAN),
       "7b": Shape(3584, 28, 28, 4, 18944, 152_064, 8192, 32, 72, CHAMELEON_VQGAN, tied=False)}
QUICK = Shape(64, 2, 4, 2, 128, 2048, 64, 8, 12, TINY_VQGAN)

LM = [f"lm-{m}-{g}-{t}-{s}" for m in ("full", "lora", "inbwd") for g in ("gc", "nogc") for t in ("t2i", "i2t")
      for s in SYSTEMS if not (m == "inbwd" and s == "trl")]
DIST = {"single": None, "zero3": "zero3.yaml", "ddp": "ddp_cpu.yaml", "zero2": "zero2.yaml"}
# The rows the targets of issue #13 read: full fine-tune at batch 4 x 1,100 with gradient
# checkpointing (without it the model's own loss does not fit in 24 GB: 16 B/param + 105 KB per token
# and layer + ~3 logits-sized buffers), ours and the model's loss on t2i and i2t, TRL on i2t; the
# VQ-GAN, the measured activation constants, the step in backward (memory), generation and ZeRO-3.
# Its variants took 28 min on the idle 2-core Intel kind (2026-12-02); slower kinds take longer
# (the estimate for the machine at hand is printed first).
# LoRA and no-GC rows: --only.
DEFAULT_PLAN = ["vq-b1", "vq-b2", "act", "lm-full-gc-t2i-ours", "lm-full-gc-t2i-model", "lm-full-gc-i2t-ours",
                "lm-full-gc-i2t-model", "lm-full-gc-i2t-trl", "lm-inbwd-gc-t2i-ours", "lm-inbwd-gc-t2i-model", "gen",
                "dist-single", "dist-zero3"]


# ----------------------------------------------------------------------------- data and model

def prepare(root: Path, shape: Shape, with_lm: bool) -> None:
    """Once per shape: a text tokenizer with ``text_rows`` entries, pre-tokenised t2i + i2t samples
    of ``sample_tokens`` (random 8192-colour images through a PixelTokenizer: a grid x grid code
    grid per image, the LM sees the same ids a VQ-GAN's would give), and, ``with_lm``, one LM folder
    per layer count (random Qwen2 weights)."""
    import datasets
    import numpy as np
    from common import wide_text_tokenizer
    from PIL import Image

    from unimodal import PixelTokenizer, PixelTokenizerConfig, add_image_tokens
    from unimodal.data import PretokenizeOptions, pretokenize, save_pretokenized
    from unimodal.offline import SAMPLE_TEXT, build_causal_lm

    tokenizer = wide_text_tokenizer(shape.text_rows)
    lm_dir = root / f"lm-{shape.layers}"
    if with_lm and not (lm_dir / "config.json").exists():
        model = build_causal_lm("qwen2", vocab_size=shape.text_rows, hidden_size=shape.hidden,
                                num_layers=shape.layers, num_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                intermediate_size=shape.intermediate, max_position_embeddings=2048,
                                tie_word_embeddings=shape.tied)
        model.save_pretrained(lm_dir)
        del model
    # Its own folder: next to a qwen2 config.json, AutoTokenizer would load it as a Qwen2Tokenizer,
    # which adds an <|endoftext|> token of its own.
    tokenizer.save_pretrained(root / "text_tokenizer")
    if (root / "data" / "unimodal_data.json").exists():
        return
    rng = np.random.default_rng(0)
    palette = (rng.uniform(-1, 1, (shape.codes, 3))).tolist()
    pixels = PixelTokenizer(PixelTokenizerConfig(codebook_size=shape.codes, image_size=shape.grid, palette=palette))
    words = " ".join(SAMPLE_TEXT).split()
    captions = []
    for i in range(16):
        caption = words[i % len(words)]
        while len(tokenizer(caption).input_ids) < shape.caption_tokens:
            caption += " " + words[(i + len(caption)) % len(words)]
        captions.append(caption)
    images = [Image.fromarray(rng.integers(0, 256, (shape.grid, shape.grid, 3), dtype=np.uint8)) for _ in captions]
    source = datasets.Dataset.from_dict({"image": images, "caption": captions})
    processor = add_image_tokens(build_causal_lm("qwen2", vocab_size=shape.text_rows, hidden_size=16),
                                 tokenizer, pixels)
    options = PretokenizeOptions(tasks=("t2i", "i2t"))
    result = pretokenize(source, processor, options, cache_dir=root / "cache")
    save_pretokenized(result, root / "data", processor, options)


def lm_arguments(root: Path, shape: Shape):
    """The recipe's model arguments for the prepared LM (what `load_model_and_processor` reads)."""
    from unimodal.finetune import ModelArguments

    return ModelArguments(model_name_or_path=str(root / f"lm-{shape.layers}"),
                          tokenizer_name_or_path=str(root / "text_tokenizer"))


def recipe_argv(args, shape: Shape, out: Path, task: str, system: str, lora: bool, gc: bool, batch: int,
                in_backward: bool = False) -> list[str]:
    root = Path(args.root)
    argv = ["--dataset_path", str(root / "data"), "--model_name_or_path", str(root / f"lm-{shape.layers}"),
            "--tokenizer_name_or_path", str(root / "text_tokenizer"),
            "--tasks", task, "--eval_size", "1", "--eval_batch_size", "1", "--max_length", str(shape.sample_tokens + 8),
            "--per_device_batch_size", str(batch), "--max_steps", str(args.steps), "--learning_rate", "1e-4",
            "--warmup_steps", "0", "--save_steps", str(10**9), "--log_steps", str(10**9), "--report_to", "none",
            "--cfg_dropout", "0", "--gradient_checkpointing", str(gc).lower(), "--use_lora", str(lora).lower(),
            "--mixed_precision", args.precision, "--loss", "chunked" if system == "ours" else "model",
            "--output_dir", str(out)]
    if in_backward:  # the step inside backward cannot clip (the global norm is not known yet)
        argv += ["--optimizer_in_backward", "true", "--max_grad_norm", "0"]
    return argv


# ----------------------------------------------------------------------------- workers (one per process)

def run_vq(args, shape: Shape, batch: int) -> dict:
    import yaml

    from unimodal import VQGAN, VQGANConfig
    from unimodal.vq.convert import from_taming

    dd = shape.vqgan["ddconfig"]
    path = Path(args.root) / "vqgan.yaml"
    path.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": shape.vqgan}}))
    random_weights = VQGAN(VQGANConfig(
        codebook_size=shape.vqgan["n_embed"], image_size=dd["resolution"], ch=dd["ch"], ch_mult=dd["ch_mult"],
        num_res_blocks=dd["num_res_blocks"], attn_resolutions=[], z_channels=dd["z_channels"],
        embed_dim=shape.vqgan["embed_dim"], use_l2_norm=False, mid_attention=True)).state_dict()
    vq = from_taming(random_weights, path).model.eval().to(DEVICE)  # the converter's reading of the yaml
    pixels = torch.rand(batch, 3, dd["resolution"], dd["resolution"], device=DEVICE) * 2 - 1
    with torch.no_grad(), torch.autocast(DEVICE, torch.bfloat16, enabled=args.precision == "bf16"):
        start = clock()
        codes = vq.encode(pixels)  # [B, 32, 32]
        encoded = clock()
        vq.decode(codes)  # [B, 3, 512, 512]
        decoded = clock()
    return {"encode_images_per_s": batch / (encoded - start), "decode_images_per_s": batch / (decoded - encoded),
            "grid": list(codes.shape[1:]), "peak_gb": peak_memory_gb()}


def clock() -> float:
    """Wall seconds, after the GPU's queued work is done."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def gpu_peak() -> dict:
    """The bf16 matmul rate of this GPU (the MFU denominator), on GPUs only."""
    if DEVICE != "cuda":
        return {}
    return {"bf16_peak_flops": matmul_peak(torch.bfloat16, n=8192, repeats=5, wall=True, device=DEVICE)}


def run_recipe(args, shape: Shape, task: str, system: str, lora: bool, gc: bool, batch: int,
               in_backward: bool = False) -> dict:
    from unimodal.recipes.finetune import main as finetune

    out = Path(args.root) / "runs" / args.worker
    finetune(recipe_argv(args, shape, out, task, system, lora, gc, batch, in_backward))
    stats = json.loads((out / "train_stats.json").read_text())
    return {**stats, **gpu_peak(), "peak_gb": peak_memory_gb(), "rank": int(os.environ.get("RANK", 0))}


def run_trl(args, shape: Shape, task: str, lora: bool, gc: bool) -> dict:
    import numpy as np
    from common import time_trainer
    from trl import SFTConfig, SFTTrainer

    from unimodal.data import DEFAULT_LOSS_ON, PROCESSOR_SUBFOLDER, SequenceFormat, loss_mask
    from unimodal.extend import new_token_ids
    from unimodal.finetune import DataArguments, LoraArguments, apply_lora, load_model_and_processor, load_task_data
    from unimodal.processor import UnimodalProcessor

    root = Path(args.root)
    data_processor = UnimodalProcessor.from_pretrained(root / "data" / PROCESSOR_SUBFOLDER)
    model, processor = load_model_and_processor(lm_arguments(root, shape), data_processor)
    if lora:  # the recipe's adapters and trainable image rows
        model = apply_lora(model, new_token_ids(processor), LoraArguments(use_lora=True))
    train, _ = load_task_data(DataArguments(dataset_path=str(root / "data"), tasks=[task], eval_size=1), processor)
    fmt = SequenceFormat.from_processor(processor)
    train = train.map(lambda ids: {"completion_mask": loss_mask(np.asarray(ids), fmt, DEFAULT_LOSS_ON[task])
                                   .astype(np.int8).tolist()}, input_columns="input_ids")
    train = train.select_columns(["input_ids", "completion_mask"])  # pre-tokenised: TRL builds labels only
    config = SFTConfig(
        output_dir=str(root / "runs" / args.worker), max_steps=args.steps, per_device_train_batch_size=args.batch,
        max_length=shape.sample_tokens + 8, packing=False, completion_only_loss=True, learning_rate=1e-4,
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[], save_strategy="no",
        logging_steps=10**9, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=processor.tokenizer)
    return {**time_trainer(trainer), **gpu_peak()}


def run_gen(args, shape: Shape) -> dict:
    from generate import run_hf, run_ours  # benchmarks/generate.py: the same two systems, batch 1

    from unimodal.data import PROCESSOR_SUBFOLDER
    from unimodal.finetune import load_model_and_processor
    from unimodal.generation import DecodeStats, resolve_sampling
    from unimodal.processor import UnimodalProcessor

    root = Path(args.root)
    model, processor = load_model_and_processor(
        lm_arguments(root, shape), UnimodalProcessor.from_pretrained(root / "data" / PROCESSOR_SUBFOLDER))
    model.to(DEVICE, torch.bfloat16 if args.precision == "bf16" else torch.float32).eval()
    sampling = resolve_sampling("liquid")
    n, hf_tokens = processor.num_image_tokens, min(args.gen_hf_tokens or 10**9, processor.num_image_tokens)
    start = clock()
    run_ours(model, processor, 1, sampling)
    ours = clock() - start
    start = clock()
    run_hf(model, processor, 1, sampling, tokens=hf_tokens)
    hf = clock() - start
    # The static cache and compiled step (CUDA graphs on a GPU, inductor on a CPU): the first image
    # compiles (its wall time is the warm-up), the second is timed. A failed compile falls back to
    # the eager step with a warning, which the row then shows.
    stats = DecodeStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = clock()
        run_ours(model, processor, 1, sampling, static_cache=True, compile=True, stats=stats)
        warm_up = clock() - start
        start = clock()
        run_ours(model, processor, 1, sampling, static_cache=True, compile=True)
        compiled = clock() - start
    fallback = [str(w.message)[:200] for w in caught if "eager" in str(w.message)]
    return {"tokens": n, "ours_tokens_per_s": n / ours, "hf_tokens": hf_tokens, "hf_tokens_per_s": hf_tokens / hf,
            "compiled_tokens_per_s": n / compiled, "compiled_warm_up_s": warm_up,
            "compile_seconds": stats.compile_seconds, "compile_fallback": fallback[:1], "peak_gb": peak_memory_gb()}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    shape = current_shape(args)
    kind, *rest = args.worker.split("-")
    if kind == "prepare":
        prepare(Path(args.root), shape, with_lm=rest == ["lm"])
        result = {}
    elif kind == "vq":
        result = run_vq(args, shape, int(rest[0][1:]))
    elif kind == "lm" and rest[3] == "trl":
        result = run_trl(args, shape, rest[2], rest[0] == "lora", rest[1] == "gc")
    elif kind == "lm":
        result = run_recipe(args, shape, rest[2], rest[3], rest[0] == "lora", rest[1] == "gc", args.batch,
                            in_backward=rest[0] == "inbwd")
    elif kind == "gen":
        result = run_gen(args, shape)
    elif kind == "act":
        result = run_activations(args, shape)
    else:  # dist-*: the recipe on i2t, full fine-tune, GC, our loss (the same in every dist row)
        result = run_recipe(args, shape, "i2t", "ours", False, True, args.dist_batch)
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the driver

def current_shape(args) -> Shape:
    shape = QUICK if args.quick else LMS[args.lm]
    return replace(shape, layers=args.layers) if args.layers else shape


def child_command(args, name: str) -> list[str]:
    own = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *args.passthrough]
    config = DIST.get(name.split("-", 1)[1]) if name.startswith("dist-") else None
    if config is None:
        return own
    threads = max(1, args.threads // 2)  # what accelerate launch gives each of 2 CPU processes
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / config),
            "--num_processes", "2", "--main_process_port", str(29600 + os.getpid() % 300),
            str(Path(__file__).resolve()), "--worker", name, *args.passthrough, "--threads", str(threads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds per variant), the same rows")
    parser.add_argument("--only", nargs="+", help="variant names or patterns (default: the default plan)")
    parser.add_argument("--list", action="store_true", help="print every variant with its estimate and exit")
    parser.add_argument("--memory_guide", action="store_true",
                        help="print docs/distributed.md's derived per-GPU memory table and exit")
    parser.add_argument("--lm", default="0.5b", choices=sorted(LMS), help="the Qwen2.5 shape (default 0.5b)")
    parser.add_argument("--layers", type=int, help="LM layers (default: the shape's; quick 2)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step of the lm-* variants")
    parser.add_argument("--dist_batch", type=int, default=1, help="samples per step and process of dist-*")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per variant; the first is warm-up")
    parser.add_argument("--gen_hf_tokens", type=int, default=256,
                        help="time transformers' generate over this many of the image's tokens (0: all; its two "
                             "full-vocabulary forwards per token take ~8 min for 1024 at the 0.5B shape on 2 cores)")
    parser.add_argument("--precision", default="no", choices=["no", "bf16"], help="the recipe's mixed_precision")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory_limit_gb", type=float, help="kill a variant above this (default: free - 1.5 GB)")
    parser.add_argument("--timeout_s", type=float, default=3600, help="per variant")
    parser.add_argument("--root", default=str(REPO / "outputs" / "bench_scale"))
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker:  # workers get the parent's final root
        args.root = str(Path(args.root) / ("quick" if args.quick else args.lm))
    args.passthrough = [x for k in ("quick",) if getattr(args, k) for x in (f"--{k}",)] + [
        x for k in ("lm", "layers", "batch", "dist_batch", "steps", "gen_hf_tokens", "precision", "threads",
                    "root")
        if getattr(args, k) is not None for x in (f"--{k}", str(getattr(args, k)))]
    if args.worker:
        return worker(args)
    if args.memory_guide:
        return print(memory_guide(LMS))
    shape = current_shape(args)
    names = [f"vq-b{b}" for b in (1, 2, 4)] + LM + ["gen", "act"] + [f"dist-{d}" for d in DIST]
    patterns = args.only or DEFAULT_PLAN
    plan = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"--only {unknown} match no variant; see --list")
    torch.set_num_threads(args.threads)
    rate = matmul_peak(torch.float32, n=1024, repeats=3, wall=True)
    estimates = {n: estimate_seconds(n, shape, args, rate) for n in (names if args.list else plan)}
    if args.list:
        for n, s in estimates.items():
            print(f"{'*' if n in DEFAULT_PLAN else ' '} {n:24s} ~{s / 60:5.1f} min")
        return
    limit = args.memory_limit_gb or max(1.0, memory_available_gb() - 1.5)
    header = (f"{date.today()}, {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads,"
              f" torch {torch.__version__}, fp32 matmul {rate / 1e9:.0f} GFLOP/s, memory limit {limit:.1f} GB; "
              f"LM {shape.layers} layers, hidden {shape.hidden}, {shape.text_rows} + {shape.codes} rows, "
              f"{shape.sample_tokens}-token samples, batch {args.batch}, {args.steps} steps, "
              f"precision {args.precision}")
    print(f"# {header}\n# command: python benchmarks/scale.py {' '.join(sys.argv[1:])}")
    each = ", ".join(f"{n} ~{s / 60:.1f}" for n, s in estimates.items())
    print(f"# plan: {len(plan)} variants, estimated {sum(estimates.values()) / 60:.0f} min: {each}", flush=True)
    env = bench_env(args.threads)
    with_lm = any(not n.startswith(("vq-", "act")) for n in plan)  # (a 7B-shape folder is 31 GB)
    ready = run_child(child_command(args, "prepare-lm" if with_lm else "prepare"), env, limit, args.timeout_s)
    if ready.error:
        raise SystemExit(f"preparing the data and LM failed: {ready.error}\n{ready.log[-3000:]}")
    runs = {}
    for name in plan:
        runs[name] = run_child(child_command(args, name), env, limit, args.timeout_s)
        shutil.rmtree(Path(args.root) / "runs", ignore_errors=True)  # 2 GB of final weights per LM variant
        got = runs[name]
        print(f"# {name}: {got.error or 'ok'} in {got.seconds:.0f} s (estimated {estimates[name]:.0f}); "
              f"peak {max([r.get('peak_gb', 0) for r in got.results] or [got.tree_peak_gb]):.2f} GB", flush=True)
        print(f"#   {json.dumps(got.results)}", flush=True)  # the figures, should a time limit end the run early
    table = render_table(runs, shape, args, limit)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(f"<!-- {header} -->\n<!-- python benchmarks/scale.py "
                                  f"{' '.join(sys.argv[1:])} -->\n\n{table}\n")


if __name__ == "__main__":
    main()
