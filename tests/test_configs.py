"""Every YAML that ships with the project parses with the recipe it is written for: a renamed
field or a typo in a shipped config fails here, not in a user's first run."""

import importlib.util
import sys
from pathlib import Path

import pytest

from unimodal.finetune import DataArguments, FinetuneArguments, LoraArguments, ModelArguments
from unimodal.image_data import ImageDataArguments
from unimodal.recipes import tokenize_dataset, train_tokenizer
from unimodal.training import parse_config
from unimodal.vq.losses import VQGANLossConfig
from unimodal.vq.train import VQGANModelArguments, VQGANTrainConfig

REPO = Path(__file__).resolve().parents[1]


def script(path: str):
    """Import a recipe or example script as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"_shipped_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


RECIPES = {  # config file patterns -> the dataclasses their recipe parses them into
    ("recipes/configs/finetune_*.yaml", "examples/*/finetune.yaml"):
        lambda: (ModelArguments, DataArguments, LoraArguments, FinetuneArguments),
    ("recipes/configs/train_tokenizer*.yaml", "examples/digits/tokenizer.yaml"):
        lambda: (VQGANModelArguments, ImageDataArguments, VQGANLossConfig, VQGANTrainConfig,
                 train_tokenizer.RunArguments),
    ("recipes/configs/tokenize_*.yaml", "examples/digits/tokenize.yaml"):
        lambda: (tokenize_dataset.TokenizeConfig,),
    ("examples/smollm2/demo.yaml",): lambda: (script("examples/digits/run.py").DemoConfig,),
}
CASES = [(str(path.relative_to(REPO)), types) for patterns, types in RECIPES.items()
         for pattern in patterns for path in sorted(REPO.glob(pattern))]


def test_every_shipped_config_is_covered():
    shipped = {str(p.relative_to(REPO)) for p in [*REPO.glob("recipes/configs/*.yaml"), *REPO.glob("examples/**/*.yaml")]}
    assert shipped and shipped == {path for path, _ in CASES}


@pytest.mark.parametrize("path,types", CASES, ids=[path for path, _ in CASES])
def test_config_parses(path, types):
    parsed = parse_config(types(), ["--config", str(REPO / path)])
    assert len(parsed) == len(types())
