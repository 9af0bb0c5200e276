"""The ``unimodal`` command: one argparse subcommand per task.

    unimodal train-tokenizer --config train_tokenizer [--key value ...] [--model.KEY value ...]
    unimodal tokenize-dataset --config my_data.yaml
    unimodal finetune --config finetune_smollm2_lora --max_steps 500
    unimodal generate --model runs/finetune --prompts "a red bird"
    unimodal demo --model runs/finetune [--port 7860] [--dtype bfloat16]
    unimodal convert --format {taming,llamagen,janus,emu3,diffusers} SRC OUT [--config yaml]
    unimodal configs [NAME]      # the shipped configs; NAME: print its path (accelerate/zero2)

A recipe subcommand hands everything after its name to ``unimodal.recipes.<recipe>.main`` through
`run_recipe`, as ``accelerate launch -m unimodal.recipes.<recipe>`` and, from a clone,
``recipes/<recipe>.py`` do: the same function, the same help, the same errors.

Add a subcommand by writing ``_add_<name>(subparsers)`` that registers its options and sets
``func``; heavy imports go inside ``func`` so ``unimodal --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError


def run_recipe(main: Callable[..., Any], argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Run a recipe's ``main(argv, prog=)`` as a command: a `UserError` (bad config, path or data)
    is printed as ``<prog>: error: <message>`` and exits with status 2, like a bad flag; any other
    exception is a bug and keeps its traceback. Every entry point of a recipe goes through here."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return main(None if argv is None else list(argv), prog=prog)
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


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
                      help="output folder (`unimodal finetune` or UnimodalPipeline.save_pretrained), "
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


def _configs(args: argparse.Namespace) -> None:
    from .training.config import resolve_config, shipped_configs

    if args.name:
        print(resolve_config(args.name))
        return
    for name, path in shipped_configs().items():
        print(f"{name:32s} {path}")


def _add_configs(subparsers) -> None:
    configs = subparsers.add_parser(
        "configs", help="list the shipped recipe and accelerate configs, or print the path of one",
        description="The YAML configs shipped with unimodal. A recipe takes a name directly "
                    "(--config finetune_smollm2_lora); accelerate needs a path: "
                    'accelerate launch --config_file "$(unimodal configs accelerate/zero2)" '
                    "-m unimodal.recipes.finetune ...",
    )
    configs.add_argument("name", nargs="?", help="print this config's path (e.g. accelerate/zero2)")
    configs.set_defaults(func=_configs)


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

        recipe = import_module(f"unimodal.recipes.{RECIPES[argv[0]][0]}")
        run_recipe(recipe.main, argv[1:], prog=f"unimodal {argv[0]}")
        return
    parser = argparse.ArgumentParser(prog="unimodal", description="unimodal: unified text + image-token LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_recipes(subparsers)
    _add_demo(subparsers)
    _add_convert(subparsers)
    _add_configs(subparsers)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as error:
        parser.exit(2, f"unimodal {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
