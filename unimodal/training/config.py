"""Recipe configuration: typed dataclasses from a YAML file plus ``--key value`` CLI overrides.

One mechanism for every recipe (transformers' ``HfArgumentParser`` underneath):

- ``--config`` names a YAML file, or a config shipped with the package by name
  (``--config finetune_smollm2_lora``; `shipped_configs` lists them). Its keys are fields of the
  recipe's dataclasses; a key that is not a field is an error, not ignored.
- ``--field value`` overrides the file (lists: ``--tasks t2i i2t``; booleans: ``--packing true``).
- A field typed ``dict`` is a nested section that goes as is to a model config (the tokenizer
  recipe's ``model:`` -> ``VQGANConfig(**model)``, the fine-tune recipe's ``build:``). The YAML
  section replaces the field's default; ``--model.codebook_size 256`` sets one key of it
  (``--build.rope_scaling.factor 2`` a deeper one; several values make a list:
  ``--model.ch_mult 1 2 4``). Values are read as YAML scalars: ``256`` is an int, ``true`` a
  bool, ``null`` None, ``1e-3`` a float.
- `RunArguments` is the base of every training recipe's run arguments (transformers / TRL names).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml
from transformers import HfArgumentParser

if TYPE_CHECKING:
    from transformers.hf_argparser import DataClassType

from ..errors import MissingInputError, UserError

# unimodal/recipes/configs: package data, so an installed package has them too. A clone's
# recipes/configs is a symlink to this folder, so documented paths work from the repository root.
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@dataclass
class RunArguments:
    """What every training recipe's run has: outputs, seed, precision, batch sizes, how often to
    log / evaluate / checkpoint (in optimizer steps), and the Hub upload of ``output_dir/final``.

    The names are transformers' ``TrainingArguments`` / TRL's. A recipe extends this class with its
    own knobs and may redeclare a field to give it that recipe's default.

    Args:
        output_dir: everything the run writes; relaunching the same command resumes from
            ``output_dir/checkpoints``.
        seed: data order, dropout and sampling.
        mixed_precision: ``"no"`` or ``"bf16"`` (GPUs, and CPUs with avx512_bf16 / AMX: elsewhere
            bf16 is emulated and slower than fp32); wins over the launch config's.
        per_device_batch_size: training batch per process.
        eval_batch_size: evaluation batch per process.
        log_steps: log losses every this many steps.
        eval_steps: evaluate every this many steps; 0 = only at the end (which is always done).
        save_steps: write a checkpoint every this many steps.
        keep_last: checkpoints kept (the oldest are deleted).
        report_to: ``"tensorboard"``, ``"wandb"``, ... or ``"none"``.
        push_to_hub: upload ``output_dir/final`` at the end.
        hub_model_id: the repo to upload to (default: the output folder's name).
        hub_private: create the repo private.
        preemption_grace_s: seconds between a SIGTERM / SIGUSR1 and the SIGKILL that follows it
            on this cluster: the run finishes its step, checkpoints (if the last save took less
            than the time left) and exits with code 75 (`unimodal.training.signals`).
    """

    output_dir: str = "outputs/run"
    seed: int = 0
    mixed_precision: str = "no"
    per_device_batch_size: int = 8
    eval_batch_size: int = 16
    log_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 100
    keep_last: int = 2
    report_to: str = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True
    preemption_grace_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("per_device_batch_size", "eval_batch_size", "log_steps", "save_steps", "keep_last"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.preemption_grace_s <= 0:
            raise UserError(f"preemption_grace_s must be > 0 seconds, got {self.preemption_grace_s}")
        if self.eval_steps < 0:
            raise UserError(f"eval_steps must be >= 0 (0: evaluate only at the end), got {self.eval_steps}")


def shipped_configs() -> dict[str, Path]:
    """The YAML configs that ship with the package, by name: ``{"finetune_smollm2_lora": path,
    "accelerate/zero2": path, ...}`` (the name is the path below the configs folder, no ``.yaml``)."""
    return {p.relative_to(SHIPPED_CONFIG_DIR).with_suffix("").as_posix(): p
            for p in sorted(SHIPPED_CONFIG_DIR.rglob("*.yaml"))}


def resolve_config(name_or_path: str) -> Path:
    """The YAML file ``--config`` means: an existing file, else a shipped config of that name.

    ``finetune_smollm2_lora``, ``finetune_smollm2_lora.yaml`` and the documented clone path
    ``recipes/configs/finetune_smollm2_lora.yaml`` all name the shipped file, so commands from the
    docs also work for an installed package. Raises `MissingInputError` listing the shipped names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = re.sub(r"^(\./)?(unimodal/)?(recipes/configs/)?", "", path.as_posix())
    name = name.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_configs()
    if name in shipped:
        return shipped[name]
    recipes = [n for n in shipped if not n.startswith("accelerate/")]
    raise MissingInputError(
        f"config {name_or_path!r}: no such file, and no shipped config of that name. Pass a YAML file "
        f"or one of the shipped configs: {', '.join(recipes)} (launch configs for `accelerate launch "
        f"--config_file`: `unimodal configs`)")


def _dict_fields(dataclass_types: tuple[type, ...]) -> dict[str, Any]:
    """Fields typed ``dict`` (nested config sections) -> their default value."""
    found = {}
    for t in dataclass_types:
        hints = typing.get_type_hints(t)
        for f in dataclasses.fields(t):
            if typing.get_origin(hints[f.name]) is dict or hints[f.name] is dict:
                found[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return found


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_value(text: str) -> Any:
    """A CLI value as YAML reads it (``256`` -> int, ``true`` -> bool, ``[1, 2]`` -> list), plus
    ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``); text that is not valid YAML stays a string."""
    if _FLOAT.fullmatch(text):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _split_nested_overrides(args: list[str], names: set[str]) -> tuple[list[str], list[tuple[str, list[str], Any]]]:
    """Take ``--section.key[.sub] VALUE...`` (or ``--section.key=VALUE``) out of ``args`` for the
    dict fields ``names``; returns the other arguments and ``(section, [key, sub], value)``."""
    rest, overrides, i = [], [], 0
    while i < len(args):
        head, eq, inline = args[i].partition("=")
        section, dot, key = head[2:].partition(".") if head.startswith("--") else ("", "", "")
        if not dot or section.replace("-", "_") not in names:
            rest.append(args[i])
            i += 1
            continue
        keys = key.split(".")
        if not all(keys):
            raise UserError(f"{head}: expected --{section}.KEY VALUE")
        if eq:
            values, i = [inline], i + 1
        else:
            end = i + 1
            while end < len(args) and not args[end].startswith("--"):
                end += 1
            values, i = args[i + 1:end], end
        if not values:
            raise UserError(f"{head} needs a value")
        parsed = [_parse_value(v) for v in values]
        overrides.append((section.replace("-", "_"), keys, parsed[0] if len(parsed) == 1 else parsed))
    return rest, overrides


def _set_nested(section: dict, keys: list[str], value: Any, name: str) -> None:
    for key in keys[:-1]:
        section = section.setdefault(key, {})
        if not isinstance(section, dict):
            raise UserError(f"--{name}.{'.'.join(keys)}: {key} is not a mapping")
    section[keys[-1]] = value


def _whole_section(name: str):
    def refuse(text: str):
        raise argparse.ArgumentTypeError(f"set one key at a time: --{name}.KEY VALUE (e.g. --{name}.hidden_size 64), "
                                         f"or the whole section in the YAML file")
    return refuse


def parse_config(dataclass_types: tuple[type, ...], args: list[str] | None = None, *,
                 prog: str | None = None, description: str | None = None) -> tuple:
    """Parse ``--config`` then ``--field value`` overrides into instances of ``dataclass_types``.

    See the module docstring for the rules. ``prog`` and ``description`` are what ``--help``
    prints (the ``unimodal`` command passes ``unimodal <recipe>``). Every field needs a default.
    Raises `UserError` for unknown keys, a missing config or arguments no dataclass has.
    """
    args = list(sys.argv[1:] if args is None else args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, rest = pre.parse_known_args(args)

    parser = HfArgumentParser(cast("Iterable[DataClassType]", dataclass_types), prog=prog, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file, or the name of a shipped config: " + ", ".join(
                            n for n in shipped_configs() if not n.startswith("accelerate/")))
    sections = _dict_fields(dataclass_types)
    values: dict[str, Any] = {}
    if known.config:
        path = resolve_config(known.config)
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
        fields = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise UserError(f"{path}: unknown keys {unknown}; valid keys: {sorted(fields)}")
        for name in sections:
            if name in values and not isinstance(values[name] or {}, dict):
                raise UserError(f"{path}: `{name}` must be a mapping (key: value lines), got {values[name]!r}")
    rest, overrides = _split_nested_overrides(rest, set(sections))
    for name, default in sections.items():
        section = copy.deepcopy(values.get(name) or default)
        for _, keys, value in (o for o in overrides if o[0] == name):
            _set_nested(section, keys, value, name)
        values[name] = section
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in sections:
            action.type, action.metavar = _whole_section(action.dest), "VALUE"
            # what --help shows; --model alone is refused
            cast(list[str], action.option_strings)[:] = [f"--{action.dest}.KEY"]
            action.help = f"a nested section: set one key with --{action.dest}.KEY VALUE (now: %(default)s)"
        elif action.help is None and action.dest != "help":
            action.help = "default: %(default)s"  # with --config: the file's value
    *outputs, extra = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if extra:
        raise UserError(f"unrecognised arguments: {extra} (see --help)")
    # The --config flag itself comes back as an extra Namespace: keep only the dataclasses.
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))
