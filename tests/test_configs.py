"""The shipped configs and the documented commands: every YAML parses with the recipe it is written
for and its values land in the parsed config; every config path the docs name exists; shipped
configs resolve by name; the recipes answer ``--help`` and bad input from the command line."""

import ast
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unimodal.errors import MissingInputError
from unimodal.finetune import DataArguments, FinetuneArguments, LoraArguments, ModelArguments
from unimodal.finetune.model import build_model
from unimodal.image_data import ImageDataArguments
from unimodal.offline import train_text_tokenizer
from unimodal.recipes import generate, tokenize_dataset, train_tokenizer
from unimodal.training import parse_config, resolve_config, shipped_configs
from unimodal.training.config import SHIPPED_CONFIG_DIR
from unimodal.vq.losses import VQGANLossConfig
from unimodal.vq.train import VQGANModelArguments, VQGANTrainConfig

REPO = Path(__file__).resolve().parents[1]
FINETUNE = (ModelArguments, DataArguments, LoraArguments, FinetuneArguments)
TOKENIZER = (VQGANModelArguments, ImageDataArguments, VQGANLossConfig, VQGANTrainConfig,
             train_tokenizer.TokenizerRunArguments)


@pytest.fixture
def demo_config(monkeypatch):
    """``DemoConfig`` of examples/digits/run.py, imported for this test only (its dataclass resolves
    annotations through sys.modules, so the module is registered there until the test ends)."""
    spec = importlib.util.spec_from_file_location("_digits_demo_run", REPO / "examples" / "digits" / "run.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module.DemoConfig


RECIPES = {  # config file patterns -> the dataclasses their recipe parses them into
    ("unimodal/recipes/configs/finetune_*.yaml", "examples/*/finetune.yaml"): FINETUNE,
    ("unimodal/recipes/configs/train_tokenizer*.yaml", "examples/digits/tokenizer.yaml"): TOKENIZER,
    ("examples/digits/tokenize.yaml",): (tokenize_dataset.TokenizeConfig,),
    ("examples/digits/generate.yaml",): (generate.GenerateConfig,),
    ("examples/smollm2/demo.yaml",): "demo",
}
CASES = [(str(path.relative_to(REPO)), types) for patterns, types in RECIPES.items()
         for pattern in patterns for path in sorted(REPO.glob(pattern))]


def test_every_shipped_config_is_covered():
    shipped = {str(p.relative_to(REPO)) for p in [*SHIPPED_CONFIG_DIR.glob("*.yaml"), *REPO.glob("examples/**/*.yaml")]}
    assert len(shipped) >= 9 and shipped == {path for path, _ in CASES}


@pytest.mark.parametrize("path,types", CASES, ids=[path for path, _ in CASES])
def test_config_values_land_in_the_parsed_dataclasses(path, types, request):
    if types == "demo":
        types = (request.getfixturevalue("demo_config"),)
    values = yaml.safe_load((REPO / path).read_text())
    parsed = parse_config(types, ["--config", str(REPO / path)])
    fields = {f.name: getattr(p, f.name) for p in parsed for f in dataclasses.fields(p)}
    assert values and set(values) <= set(fields)
    for key, value in values.items():
        assert fields[key] == value, key
    # The nested model sections are checked by what they go to: VQGANConfig / the LM's config.
    if types == TOKENIZER:
        vqgan = parsed[0].build(parsed[1].image_size)
        assert {k: getattr(vqgan.config, k) for k in values["model"]} == values["model"]
    if types == FINETUNE and "build" in values:
        lm = build_model(parsed[0].build, train_text_tokenizer())
        assert lm.config.model_type == values["build"]["model_type"]
        assert lm.config.hidden_size == values["build"]["hidden_size"]


def documents():
    """(file, text) of every place a user reads a command: docs, READMEs, shipped YAML comments,
    module docstrings of the package and of the clone's recipe scripts."""
    for p in [*REPO.glob("docs/*.md"), REPO / "README.md", *REPO.glob("examples/**/README.md"),
              *SHIPPED_CONFIG_DIR.rglob("*.yaml"), *REPO.glob("examples/**/*.yaml")]:
        yield p, p.read_text()
    for p in [*REPO.glob("unimodal/**/*.py"), *REPO.glob("recipes/*.py")]:
        doc = ast.get_docstring(ast.parse(p.read_text()))
        if doc:
            yield p, doc


CONFIG_FLAG = re.compile(r"--config[ =]+([^\s`'\"\\),\]]+)")
CONFIG_PATH = re.compile(r"(?<![\w/])((?:unimodal/)?recipes/configs/[\w./*-]*\.yaml|examples/[\w./*-]+\.yaml)")
PLACEHOLDER = re.compile(r"(my[\w-]*\.yaml|file\.yaml|\.\.\.|[A-Z_]+)$")  # my.yaml, NAME, ...


def mentions() -> list[tuple[str, str]]:
    found = []
    for path, text in documents():
        where = str(path.relative_to(REPO))
        for line in text.splitlines():
            if "convert" in line:  # `unimodal convert --config` takes another project's yaml
                continue
            found += [(where, m) for m in CONFIG_FLAG.findall(line) if not PLACEHOLDER.match(m)]
            found += [(where, m) for m in CONFIG_PATH.findall(line)]
    return sorted(set(found))


def exists(mention: str) -> bool:
    if "*" in mention:
        return any(REPO.glob(mention))
    if (REPO / mention).is_file():
        return True
    try:  # a shipped config's name, as `--config NAME` takes it
        return not mention.endswith(".yaml") and resolve_config(mention).is_file()
    except MissingInputError:
        return False


def test_every_documented_config_exists():
    found = mentions()
    # the checker sees both kinds of mention (a docs path and a shipped name)
    assert ("docs/tokenizer.md", "recipes/configs/train_tokenizer.yaml") in found
    assert any(m == "finetune_smollm2_lora" for _, m in found)
    missing = [f"{where}: {m}" for where, m in found if not exists(m)]
    assert missing == []


def test_a_missing_documented_config_is_caught():
    # The defect this test exists for: recipes/generate.py once cited a config that did not exist.
    assert not exists("recipes/configs/generate.yaml") and not exists("generate_nope")
    assert exists("recipes/configs/accelerate/*.yaml") and exists("accelerate/zero2")


def test_shipped_configs_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a clone: only the package's own files are there
    shipped = SHIPPED_CONFIG_DIR / "finetune_smollm2_lora.yaml"
    for name in ("finetune_smollm2_lora", "finetune_smollm2_lora.yaml", "recipes/configs/finetune_smollm2_lora.yaml"):
        assert resolve_config(name) == shipped
    assert resolve_config("accelerate/zero2") == SHIPPED_CONFIG_DIR / "accelerate" / "zero2.yaml"
    names = {"finetune_smollm2_lora", "train_tokenizer", "train_tokenizer_tiny", "accelerate/zero3"}
    assert names <= set(shipped_configs())
    (tmp_path / "train_tokenizer").write_text("max_steps: 7\n")  # an existing file wins over a shipped name
    assert resolve_config("train_tokenizer") == Path("train_tokenizer")
    *_, run = parse_config(FINETUNE, ["--config", "finetune_smollm2_lora", "--max_steps", "3"])
    assert (run.max_steps, run.output_dir) == (3, "outputs/finetune_smollm2_lora")
    with pytest.raises(MissingInputError, match="no shipped config.*finetune_smollm2_lora, train_tokenizer"):
        parse_config(FINETUNE, ["--config", "finetune_nope"])


def test_clone_path_is_the_package_folder():
    assert (REPO / "recipes" / "configs").is_symlink()
    assert (REPO / "recipes" / "configs").resolve() == SHIPPED_CONFIG_DIR


def test_unimodal_configs_prints_a_shipped_path(capsys):
    from unimodal.cli import main

    main(["configs", "accelerate/zero2"])
    assert capsys.readouterr().out.strip() == str(SHIPPED_CONFIG_DIR / "accelerate" / "zero2.yaml")
    main(["configs"])
    assert "finetune_smollm2_lora" in capsys.readouterr().out


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("entry,prog", [(["-m", "unimodal", "finetune"], "unimodal finetune"),
                                        (["-m", "unimodal.recipes.finetune"], "finetune.py")],
                         ids=["unimodal finetune", "python -m unimodal.recipes.finetune"])
def test_recipe_help_from_both_entry_points(entry, prog):
    proc = _run(*entry, "--config", "finetune_smollm2_lora", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: {prog} ")
    assert "Fine-tune a causal LM" in proc.stdout  # the recipe's own description
    assert "--build.KEY" in proc.stdout and "default: outputs/smollm2" in proc.stdout  # the config's value


def test_user_errors_exit_2_without_a_traceback():
    proc = _run("recipes/finetune.py", "--config", "finetune_smollm2_lora", "--dataset_path", "no/such/data")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "finetune.py: error: dataset_path 'no/such/data' is not pre-tokenised data" in proc.stderr
    assert "unimodal tokenize-dataset" in proc.stderr and "Traceback" not in proc.stderr
