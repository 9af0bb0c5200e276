"""The ``unimodal`` command: one argparse subcommand per task.

    unimodal train-tokenizer --config train_tokenizer.yaml [--key value ...]
    unimodal tokenize-dataset --config my_data.yaml
    unimodal finetune --config finetune_smollm2_lora.yaml --max_steps 500
    unimodal generate --model runs/finetune --prompts "a red bird"
    unimodal demo --model runs/finetune [--port 7860] [--dtype bfloat16]
    unimodal convert --format {taming,llamagen,janus,emu3,diffusers} SRC OUT [--config yaml]

A recipe subcommand hands everything after its name to ``unimodal.recipes.<recipe>.main``, the
same function ``accelerate launch -m unimodal.recipes.<recipe>`` and ``recipes/<recipe>.py`` run.

Add a subcommand by writing ``_add_<name>(subparsers)`` that registers its options and sets
``func``; heavy imports go inside ``func`` so ``unimodal --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    # Before gradio is imported: no telemetry or version checks, uploads where the user says.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.temp_dir:
        os.environ["GRADIO_TEMP_DIR"] = os.path.abspath(args.temp_dir)
    try:
        from .webdemo import DemoLimits, load_pipeline, serve
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise SystemExit("the web demo needs gradio: pip install 'unimodal[demo]'") from error

    pipeline = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    limits = DemoLimits(max_images=args.max_images, max_upload_bytes=int(args.max_upload_mb * 2**20))
    serve(pipeline, host=args.host, port=args.port, limits=limits, block=True)


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="serve the Liquid-style web demo (text to image, image to text, chat)",
        description="Serve a web demo over a UnimodalPipeline folder on this machine.",
    )
    demo.add_argument("--model", required=True,
                      help="output folder (recipes/finetune.py or UnimodalPipeline.save_pretrained), "
                           "a run folder with final/ inside, or a Hub repo id")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default: this machine only; 0.0.0.0 exposes it)")
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    demo.add_argument("--dtype", default="float32", help="LM weights dtype: float32 or bfloat16")
    demo.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    demo.add_argument("--max-images", type=int, default=8, help="images per text-to-image request at most")
    demo.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    demo.add_argument("--temp-dir", default=None, help="where uploads and outputs are cached (GRADIO_TEMP_DIR)")
    demo.set_defaults(func=_demo)


def _convert(args: argparse.Namespace) -> None:
    from .vq.convert import convert_checkpoint

    conversion = convert_checkpoint(args.format, args.src, args.out, config=args.config, image_size=args.image_size)
    for note in conversion.notes:
        print(f"note: {note}")
    c = conversion.model.config
    print(f"saved a VQGAN ({c.codebook_size} codes, f={c.downsample_factor}, {c.image_size}px) to {args.out}")


def _add_convert(subparsers) -> None:
    from .vq.convert import FORMATS

    convert = subparsers.add_parser(
        "convert", help="convert a pretrained VQ tokenizer (taming/Chameleon, LlamaGen, Janus, Emu3, diffusers)",
        description="Load another project's VQ tokenizer into a unimodal VQGAN and save it as a "
                    "from_pretrained folder (config.json + model.safetensors). See docs/convert.md.",
    )
    convert.add_argument("--format", required=True, choices=FORMATS,
                         help="taming: Lightning .ckpt (+ --config yaml); llamagen: .pt; janus/emu3/diffusers: "
                              "a transformers/diffusers folder or Hub repo id")
    convert.add_argument("src", help="checkpoint file, model folder or Hub repo id")
    convert.add_argument("out", help="output folder")
    convert.add_argument("--config", default=None, help="the yaml the taming/Chameleon checkpoint was trained with")
    convert.add_argument("--image-size", type=int, default=None,
                         help="resolution the tokenizer is used at (default: the source's own; see docs/convert.md)")
    convert.set_defaults(func=_convert)


# subcommand -> (recipe module, one-line help)
RECIPES = {
    "train-tokenizer": ("train_tokenizer", "train a VQ-GAN image tokenizer"),
    "tokenize-dataset": ("tokenize_dataset", "pre-tokenise captioned images / interleaved documents"),
    "finetune": ("finetune", "fine-tune a causal LM on text + image tokens (full or LoRA)"),
    "generate": ("generate", "text-to-image, image-to-text or text-to-text with a fine-tuned model"),
}


def _add_recipes(subparsers) -> None:
    # Listed for --help only: `main` hands a recipe's arguments to the recipe before argparse
    # sees them (the recipe parses, and documents with --help, its own typed config).
    for name, (_, help_text) in RECIPES.items():
        subparsers.add_parser(name, help=help_text, add_help=False)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``unimodal`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RECIPES:
        from importlib import import_module

        import_module(f"unimodal.recipes.{RECIPES[argv[0]][0]}").main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="unimodal", description="unimodal: unified text + image-token LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_recipes(subparsers)
    _add_demo(subparsers)
    _add_convert(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
