"""Shared fixtures: tiny text tokenizers, LMs and image tokenizers built in-process."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny test models are dominated by threading overhead (measured ~20x slower per
# step with 2 threads on a loaded 2-core box), and multi-process tests get one core each.
torch.set_num_threads(1)


@pytest.fixture
def text_tokenizer():
    # Function-scoped: add_image_tokens extends the tokenizer in place (training takes ~5 ms).
    from unimodal.offline import train_text_tokenizer

    return train_text_tokenizer()


@pytest.fixture
def pixel_tokenizer():
    from unimodal import PixelTokenizer, PixelTokenizerConfig

    return PixelTokenizer(PixelTokenizerConfig(codebook_size=16, image_size=8))
