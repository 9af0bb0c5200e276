"""Shared fixtures: tiny text tokenizers, LMs, image tokenizers and pipelines built in-process, the
pre-tokenised digits a fine-tune reads, and a Hub whose network is faked.

Tests take the builders through fixtures (``tiny_pipeline_factory``, ``finetune_data_factory``)
rather than importing this file or each other.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from unimodal import UnimodalPipeline, UnimodalProcessor
    from unimodal.vq import ImageTokenizerMixin

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny test models are dominated by threading overhead (measured ~20x slower per
# step with 2 threads on a loaded 2-core box), and multi-process tests get one core each.
torch.set_num_threads(1)


# ---------------------------------------------------------------------------- tiny models

def make_pipeline(
    model_type: str = "llama",
    *,
    image_size: int = 8,
    pixel_size: int = 1,
    codebook_size: int = 16,
    hidden_size: int = 32,
    tie: bool = False,
    seed: int = 0,
    text_tokenizer: PreTrainedTokenizerBase | None = None,
    image_tokenizer: ImageTokenizerMixin | None = None,
    base_dir: Path | None = None,
) -> UnimodalPipeline:
    """A random tiny LM of ``model_type`` extended with image tokens, as a `UnimodalPipeline`.

    The LM is `unimodal.offline.build_causal_lm` (2 layers, ``hidden_size``, weights drawn after
    ``torch.manual_seed(seed)``) sized to the text tokenizer, then `add_image_tokens`. Its model is
    in eval mode; a test that trains calls ``.train()``.

    Args:
        model_type: any key of `unimodal.offline.TINY_ARCHITECTURES`.
        image_size, pixel_size, codebook_size: the grey `PixelTokenizer` built when
            ``image_tokenizer`` is None: ``(image_size // pixel_size) ** 2`` image tokens per image.
        hidden_size, tie, seed: the LM's width, tied input/output embeddings, init seed.
        text_tokenizer: extended in place; default a fresh `train_text_tokenizer()`.
        image_tokenizer: e.g. a `VQGAN`; replaces the pixel tokenizer.
        base_dir: save the LM here before extending it: a base checkpoint others can load (a LoRA
            adapter's output names one).
    """
    from unimodal import PixelTokenizer, PixelTokenizerConfig, UnimodalPipeline, add_image_tokens
    from unimodal.offline import build_causal_lm, train_text_tokenizer

    tokenizer = train_text_tokenizer() if text_tokenizer is None else text_tokenizer
    if image_tokenizer is None:
        image_tokenizer = PixelTokenizer(PixelTokenizerConfig(
            codebook_size=codebook_size, image_size=image_size, pixel_size=pixel_size))
    model = build_causal_lm(model_type, vocab_size=len(tokenizer), hidden_size=hidden_size,
                            tie_word_embeddings=tie, seed=seed)
    if base_dir is not None:
        model.save_pretrained(base_dir)
    processor = add_image_tokens(model, tokenizer, image_tokenizer)
    return UnimodalPipeline(model.eval(), processor)


@pytest.fixture(scope="session")
def tiny_pipeline_factory():
    """`make_pipeline`: call it with the sizes a test's assertions depend on."""
    return make_pipeline


@pytest.fixture
def tiny_pipeline():
    """The default tiny pipeline: untied Llama, 16 grey levels, 8x8 images of 8x8 = 64 tokens."""
    return make_pipeline()


@pytest.fixture
def text_tokenizer():
    # Function-scoped: add_image_tokens extends the tokenizer in place (training takes ~5 ms).
    from unimodal.offline import train_text_tokenizer

    return train_text_tokenizer()


@pytest.fixture
def pixel_tokenizer():
    from unimodal import PixelTokenizer, PixelTokenizerConfig

    return PixelTokenizer(PixelTokenizerConfig(codebook_size=16, image_size=8))


# ---------------------------------------------------------------------------- fine-tuning data

def build_finetune_data(root: Path, text_tokenizer: PreTrainedTokenizerBase, num_digits: int | None = None,
                        image_size: int = 8) -> tuple[Path, UnimodalProcessor]:
    """Pre-tokenised captioned digits (t2i + i2t) in ``root/data`` and the base text tokenizer in
    ``root/text_tokenizer``, as ``recipes/tokenize_dataset.py`` would write them.

    Returns the data folder and the processor that encoded it (16 grey levels, one token per pixel).
    """
    from digits import load_digits_dataset  # examples/digits/digits.py, on pytest's pythonpath

    from unimodal.data import PretokenizeOptions, pretokenize, save_pretokenized

    tokenizer = copy.deepcopy(text_tokenizer)
    tokenizer.save_pretrained(root / "text_tokenizer")  # before add_image_tokens extends it
    processor = make_pipeline(image_size=image_size, text_tokenizer=tokenizer).processor
    digits = load_digits_dataset(image_size=image_size, split="train")
    if num_digits:
        digits = digits.select(range(num_digits))
    options = PretokenizeOptions(tasks=("t2i", "i2t"))
    result = pretokenize(digits, processor, options, cache_dir=root / "cache")
    return save_pretokenized(result, root / "data", processor, options), processor


@pytest.fixture(scope="session")
def finetune_data_factory():
    """`build_finetune_data(root, text_tokenizer, num_digits=None, image_size=8)`."""
    return build_finetune_data


# ---------------------------------------------------------------------------- the Hub

@dataclass
class Upload:
    """One commit the fake Hub received.

    ``folder`` is a copy of the files as they were when uploaded, so assertions see what went up,
    not the local folder (which a recipe may change or delete afterwards)."""

    repo_id: str
    private: bool | None
    commit_message: str | None
    revision: str | None
    folder: Path

    @property
    def files(self) -> set[str]:
        """Paths in the repo (POSIX, relative to its root)."""
        return {p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()}


class FakeHub:
    """Records what `HfApi.create_repo`, `upload_folder` and `create_commit` would send.

    Bare repo names resolve to the namespace ``user``, as the Hub does for the token's owner; an
    upload to a repo nobody created fails, as on the Hub."""

    user = "me"

    def __init__(self, root: Path):
        self.root = root
        self.repos: dict[str, bool | None] = {}  # repo id -> private flag it was created with
        self.uploads: list[Upload] = []

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **kwargs):
        from huggingface_hub import RepoUrl

        repo_id = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        if repo_id in self.repos and not exist_ok:
            raise ValueError(f"fake Hub: {repo_id} exists and exist_ok=False")
        self.repos.setdefault(repo_id, private)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def _commit(self, repo_id: str, commit_message: str | None, revision: str | None, write):
        from huggingface_hub import CommitInfo

        if repo_id not in self.repos:
            raise ValueError(f"fake Hub: upload to {repo_id}, which create_repo never made")
        folder = self.root / f"{len(self.uploads):03d}"
        write(folder)
        self.uploads.append(Upload(repo_id, self.repos[repo_id], commit_message, revision, folder))
        oid = f"{len(self.uploads):040x}"
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                          commit_message=commit_message or "", commit_description="", oid=oid)

    def upload_folder(self, *, repo_id: str, folder_path, commit_message: str | None = None,
                      revision: str | None = None, **kwargs):
        unsupported = {k for k in ("path_in_repo", "allow_patterns", "ignore_patterns", "delete_patterns")
                       if kwargs.get(k)}
        if unsupported:  # the copy below would then differ from what the Hub receives
            raise NotImplementedError(f"fake Hub: upload_folder with {sorted(unsupported)}")
        return self._commit(repo_id, commit_message, revision, lambda dst: shutil.copytree(folder_path, dst))

    def create_commit(self, repo_id: str, operations, *, commit_message: str | None = None,
                      revision: str | None = None, **kwargs):
        from huggingface_hub import CommitOperationAdd

        def write(dst: Path) -> None:
            for op in operations:
                if not isinstance(op, CommitOperationAdd):
                    raise NotImplementedError(f"fake Hub: {type(op).__name__}")
                target = dst / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                with op.as_file() as data:
                    target.write_bytes(data.read())

        return self._commit(repo_id, commit_message, revision, write)


@pytest.fixture
def fake_hub(tmp_path_factory, monkeypatch):
    """A `FakeHub` standing in for the Hub's network: `HfApi`'s calls that send data are patched,
    everything before them (saving, model cards, commit messages) runs for real."""
    from huggingface_hub import HfApi

    hub = FakeHub(tmp_path_factory.mktemp("hub"))
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: hub.create_repo(repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: hub.upload_folder(**kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: hub.create_commit(
        repo_id, operations, **kw))
    return hub
