"""`JanusProcessor`: Janus's text-to-image sequence format over our id pipeline.

Janus's vocabulary gets nothing added: image code ``c`` is the virtual id ``V + c`` (``V`` = rows of
the text embedding, ``text_config.vocab_size``), which `JanusImageLM` routes through the generation
embedding / aligner and reads from the generation head. The format is the one Janus's own image
generation uses (its DeepSeek chat template with an empty system prompt, then the image-start tag):

```
text-to-image   <bos> "<|User|>: {caption}\\n\\n<|Assistant|>:" <begin_of_image> K codes <end_of_image> <eos>
prompt          <bos> "<|User|>: {caption}\\n\\n<|Assistant|>:" <begin_of_image>
unconditional   the prompt with every token but <bos> and <begin_of_image> replaced by <pad>
                (Janus's own `generate(generation_mode="image")` and the original release do this)
```

Text-to-image is the only task: Janus understands images through SigLIP features, not VQ codes,
so image-to-text / interleaved sequences on VQ codes are refused with a `UserError`.

Security: the caption is encoded with ``split_special_tokens=True``, so ``"<begin_of_image>"`` in
user text stays plain text; the template around it is the processor's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import cached_file

from ..errors import UserError
from ..images import tensor_to_pil
from ..processor import IMAGE_PLACEHOLDER, IMAGE_TOKENIZER_SUBFOLDER, PROCESSOR_CONFIG_NAME, UnimodalProcessor
from ..vocab import ImageVocabulary
from .janus_vq import JanusImageTokenizer

BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
PROMPT_PREFIX = "<|User|>: "  # DeepSeek template of Janus's generation scripts, system prompt ""
PROMPT_SUFFIX = "\n\n<|Assistant|>:"
NO_I2T = ("the janus base trains text-to-image only: Janus reads images for understanding through its "
          "SigLIP encoder, not through VQ codes, so image-to-text or interleaved data on VQ codes "
          "would teach it a format it never uses; use tasks: [t2i]")


class JanusProcessor(UnimodalProcessor):
    """Janus tokenizer + Janus VQ model -> our id sequences (see the module docstring).

    Args:
        tokenizer: Janus's text tokenizer (holding ``<begin_of_image>``, ``<end_of_image>``, a pad).
        image_tokenizer: the model's VQ (`JanusImageTokenizer`).
        text_vocab_size: ``V``, rows of the model's text embedding (``text_config.vocab_size``,
            102400 for Janus-Pro; at least ``len(tokenizer)``).
        prompt_prefix, prompt_suffix: the template around the caption.
    """

    hub_commit_message = "Upload JanusProcessor"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_tokenizer: JanusImageTokenizer, *,
                 text_vocab_size: int, prompt_prefix: str = PROMPT_PREFIX, prompt_suffix: str = PROMPT_SUFFIX):
        # Not UnimodalProcessor.__init__: that one looks image tokens up in the tokenizer.
        self.tokenizer, self.image_tokenizer = tokenizer, image_tokenizer
        self.boi_token, self.eoi_token, self.image_placeholder = BOI_TOKEN, EOI_TOKEN, IMAGE_PLACEHOLDER
        self.prompt_prefix, self.prompt_suffix = prompt_prefix, prompt_suffix
        if text_vocab_size < len(tokenizer):
            raise ValueError(f"text_vocab_size={text_vocab_size} < {len(tokenizer)} tokens of the tokenizer")
        self.text_vocab_size = int(text_vocab_size)
        self.vocab = ImageVocabulary(self.text_vocab_size, image_tokenizer.codebook_size)  # ids [V, V + K)
        self.boi_token_id, self.eoi_token_id = self._token_id(BOI_TOKEN), self._token_id(EOI_TOKEN)
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.bos_token_id = tokenizer.bos_token_id
        if None in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            raise ValueError("a Janus tokenizer has bos, eos and pad tokens; this one lacks one")
        # The caption is encoded together with the template (same ids as Janus's own processor at
        # the seams) when the template holds no special token of the tokenizer; otherwise the
        # template pieces are encoded as the tokenizer reads them and the caption alone, split.
        template = prompt_prefix + prompt_suffix
        plain = tokenizer(template, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        self._joint = plain == tokenizer(template, add_special_tokens=False)["input_ids"]
        # caption tokens end this many tokens before <begin_of_image> (for truncating long captions)
        self.caption_suffix_len = len(tokenizer(prompt_suffix, add_special_tokens=False)["input_ids"])

    def _token_id(self, token: str) -> int:
        idx = cast("int | None", self.tokenizer.convert_tokens_to_ids(token))
        if idx is None or self.tokenizer.convert_ids_to_tokens(idx) != token:
            raise ValueError(f"the tokenizer has no token {token!r}: is it Janus's tokenizer?")
        return int(idx)

    # ------------------------------------------------------------------ sequences
    def prompt_ids(self, caption: str) -> list[int]:
        """``<bos> prefix caption suffix <begin_of_image>``: the generation prompt of ``caption``."""
        if self._joint:
            body = self.encode_text(self.prompt_prefix + caption + self.prompt_suffix)
        else:  # the template's own special tokens stay special; the caption's never are
            prefix, suffix = self.tokenizer([self.prompt_prefix, self.prompt_suffix],
                                            add_special_tokens=False)["input_ids"]
            body = [*prefix, *self.encode_text(caption), *suffix]
        return [self.bos_token_id, *body, self.boi_token_id]

    def text_to_image_ids(self, caption: str, codes: torch.Tensor | None = None) -> list[int]:
        """The training sequence (``prompt, <begin_of_image> K ids <end_of_image> <eos>``) or, with
        ``codes=None``, the generation prompt ending in ``<begin_of_image>``."""
        prompt = self.prompt_ids(caption)
        if codes is None:
            return prompt
        return [*prompt[:-1], *self.image_span_ids(codes), self.eos_token_id]

    def unconditional_ids_for(self, prompt: Sequence[int]) -> list[int]:
        """Janus's unconditional branch of one prompt: every id but <bos> / <begin_of_image>
        replaced by <pad> (same length; the pads are attended, as in Janus's generate)."""
        keep = (self.bos_token_id, self.boi_token_id)
        return [i if i in keep else self.pad_token_id for i in prompt]

    def unconditional_prompt_ids(self) -> list[int]:
        """The unconditional branch of the empty caption (condition dropout in training, and
        guidance when prompts differ in length; `unconditional_ids_for` matches each prompt)."""
        return self.unconditional_ids_for(self.prompt_ids(""))

    def image_to_text_ids(self, codes: torch.Tensor, caption: str | None = None) -> list[int]:
        raise UserError(NO_I2T)

    def interleaved_ids(self, texts: Sequence[str], codes: Sequence[torch.Tensor] | torch.Tensor = (), *,
                        add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        """Text only (no ``<image>`` placeholders): images inside text are refused (see NO_I2T)."""
        if len(codes) or any(self.image_placeholder in t for t in texts):
            raise UserError(NO_I2T)
        return super().interleaved_ids(texts, (), add_bos=add_bos, add_eos=add_eos)

    # ------------------------------------------------------------------ generation hooks
    def image_decoder(self, model, vocab_slice: tuple[int, int], max_length: int, static_cache: bool,
                      compile: bool | str, stats: Any):
        """The decoder `sample_image_tokens` drives: logits of the generation head ``[B, K]``."""
        from .janus_decoding import janus_image_decoder

        if tuple(vocab_slice) != self.image_token_range:
            raise ValueError(f"vocab_slice {vocab_slice} is not Janus's image range {self.image_token_range}")
        return janus_image_decoder(model, self.image_token_range, max_length, static_cache, compile, stats)

    def generate_draw_layout(self, model):
        """How Janus's ``generate(generation_mode="image")`` draws (for ``rng="global"``): over
        its generation head's ``K`` code logits, code ``c`` in column ``c``."""
        from ..generation.global_rng import DrawLayout

        lo, hi = self.image_token_range
        return DrawLayout(width=hi - lo, offset=0)

    @torch.no_grad()
    def decode_image_ids(self, image_ids: torch.Tensor) -> list[Image.Image]:
        """Image ids ``[N, h*w]`` (``V + code``) -> N PIL images, one batched VQ decode."""
        codes = self.vocab.ids_to_codes(torch.as_tensor(image_ids)).view(-1, *self.grid_shape)
        tok = self.image_tokenizer
        return tensor_to_pil(tok.decode(codes.to(tok.device)))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write the tokenizer and ``processor_config.json`` (``"base": "janus"``). The VQ model is
        written to ``image_tokenizer/`` unless the folder holds the Janus model itself (its
        ``vqmodel.*`` weights are then read from the model's shards)."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        model_config = save_directory / "config.json"
        own = model_config.is_file() and json.loads(model_config.read_text()).get("model_type") == "janus"
        if not own:
            self.image_tokenizer.save_pretrained(save_directory / IMAGE_TOKENIZER_SUBFOLDER)
        config = {
            "processor_class": type(self).__name__, "base": "janus",
            "text_vocab_size": self.text_vocab_size,
            "prompt_prefix": self.prompt_prefix, "prompt_suffix": self.prompt_suffix,
            "image_tokenizer_subfolder": None if own else IMAGE_TOKENIZER_SUBFOLDER,
            # informative (checked on load)
            "image_token_range": list(self.image_token_range), "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id, "grid_shape": list(self.grid_shape),
        }
        self.write_config_and_push(save_directory, PROCESSOR_CONFIG_NAME, config, push_to_hub, kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, **hub_kwargs) -> JanusProcessor:
        """From a folder / Hub repo written by `save_pretrained`, or a plain Janus checkpoint in
        transformers' format (``deepseek-community/Janus-Pro-1B``): then the default template is
        used, ``V`` comes from its config.json and the VQ from its ``vqmodel.*`` weights."""
        found = cached_file(path_or_repo, PROCESSOR_CONFIG_NAME, _raise_exceptions_for_missing_entries=False,
                            **hub_kwargs)
        config = json.loads(Path(found).read_text()) if found else {}
        if config.get("base", "janus") != "janus":
            raise ValueError(f"{path_or_repo}: processor_config.json is for base {config['base']!r}, not janus")
        if "text_vocab_size" in config:
            vocab_size = int(config["text_vocab_size"])
        else:
            model_config = cached_file(path_or_repo, "config.json", **hub_kwargs)
            vocab_size = int(json.loads(Path(cast(str, model_config)).read_text())["text_config"]["vocab_size"])
        sub = config.get("image_tokenizer_subfolder")
        if sub and Path(path_or_repo).is_dir():
            vq_source: str | os.PathLike = Path(path_or_repo) / sub
        elif sub:  # a Hub repo: fetch the subfolder's files
            vq_source = Path(cast(str, cached_file(path_or_repo, f"{sub}/config.json", **hub_kwargs))).parent
            cached_file(path_or_repo, f"{sub}/model.safetensors", **hub_kwargs)
        else:
            vq_source = path_or_repo
        processor = cls(AutoTokenizer.from_pretrained(path_or_repo, **hub_kwargs),
                        JanusImageTokenizer.from_janus(vq_source), text_vocab_size=vocab_size,
                        prompt_prefix=config.get("prompt_prefix", PROMPT_PREFIX),
                        prompt_suffix=config.get("prompt_suffix", PROMPT_SUFFIX))
        if "image_token_range" in config and list(processor.image_token_range) != config["image_token_range"]:
            raise ValueError(f"{path_or_repo}: image ids are {processor.image_token_range} but "
                             f"processor_config.json says {config['image_token_range']}")
        return processor
