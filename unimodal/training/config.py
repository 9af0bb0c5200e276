"""Recipe configuration: typed dataclasses from a YAML file plus ``--key value`` CLI overrides."""

from __future__ import annotations

import argparse
import dataclasses

import yaml
from transformers import HfArgumentParser


def parse_config(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Parse ``--config file.yaml`` then ``--field value`` overrides into the given dataclasses.

    YAML keys must be field names of one of the dataclasses (a typo is an error, not ignored);
    command-line values win over the file. Every field needs a default.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, rest = pre.parse_known_args(args)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", type=str, default=None, help="YAML recipe config")
    if known.config:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        fields = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{known.config}: unknown keys {unknown}; valid keys: {sorted(fields)}")
        parser.set_defaults(**values)
    *outputs, extra = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if extra:
        raise ValueError(f"unrecognised arguments: {extra}")
    # The --config flag itself comes back as an extra Namespace: keep only the dataclasses.
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))
