"""A static KV cache and a compiled decode step (`torch.compile`: inductor on CPU, CUDA graphs
on a GPU) for `KVDecoder`'s interface; speculative decoding's wider passes are compiled too, with
dynamic shapes (their width changes from pass to pass).

`transformers.StaticCache` preallocates ``[R, heads, max_length, head_dim]`` per layer and
writes in place, so every decode step has the same shapes: ``[R, 1]`` ids and positions and a
constant ``[R, max_length]`` attention mask (ones past the prompt: the causal mask hides the
positions not written yet). `torch.compile` then traces the step once. Compiling takes a while
(tens of seconds on a CPU) the first time a model and batch shape is seen in a process; the
compiled step, the cache and the sliced head are kept per model and reused, and the seconds
spent are counted in `DecodeStats.compile_seconds`. Where compiling fails (no C compiler, an
unknown backend, an unsupported Python), one warning says so and the step runs eagerly on the
same static cache.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn
from transformers import StaticCache

from .decoder import KVDecoder

_WARNED: set[str] = set()
_STATE_ATTRIBUTE = "_unimodal_static_decoding"


def _state(model: nn.Module) -> dict[str, Any]:
    """{"heads": {(lo, hi): head}, "compiled": {(backend, dynamic): callable or None},
    "caches": {shape: cache}, "warm": {shapes compiled for}}, kept in the model's own ``__dict__``
    (not registered as a submodule): the compiled callable references the model, so a table keyed
    by the model (even a weak one) would keep every model alive; on the model it goes with it."""
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        state = {"heads": {}, "compiled": {}, "caches": {}, "warm": set()}
        model.__dict__[_STATE_ATTRIBUTE] = state
    return state


def _default_backend(device: torch.device) -> str:
    return "cudagraphs" if device.type == "cuda" else "inductor"


class StaticKVDecoder(KVDecoder):
    """`KVDecoder` on a `transformers.StaticCache` of ``max_length`` positions, with the one-token
    `step` compiled when ``compile`` is set.

    Args:
        model, vocab_slice: as for `KVDecoder`.
        max_length: prompt columns + every token that will be fed (for speculative decoding,
            add the window's width).
        compile: ``False`` (static cache, eager), ``True`` (the device's default backend:
            ``"inductor"`` on a CPU, ``"cudagraphs"`` on a GPU) or a `torch.compile` backend name.
        stats: a `DecodeStats` whose ``compile_seconds`` the first (compiling) steps add to.
    """

    def __init__(self, model: nn.Module, vocab_slice: tuple[int, int] | None, max_length: int,
                 compile: bool | str = False, stats: Any = None):
        super().__init__(model, vocab_slice)
        self.max_length = max_length
        self.stats = stats
        self.backend = (_default_backend(self.device) if compile is True else compile) or None
        if self._sliced is not None and vocab_slice is not None:
            # One head object per model and slice: a compiled step guards on the module it saw.
            self._sliced = _state(self.model)["heads"].setdefault(vocab_slice, self._sliced)

    def _new_cache(self, mask: torch.Tensor) -> StaticCache:
        rows, length = mask.shape
        if length >= self.max_length:
            raise ValueError(f"prompts of {length} columns do not fit a static cache of {self.max_length}")
        caches = _state(self.model)["caches"]
        key = (rows, self.max_length, self.device, self.model.dtype)
        if key not in caches:
            caches[key] = StaticCache(config=self.model.config, max_cache_len=self.max_length)
        cache = caches[key]
        cache.reset()
        return cache

    def _prompt_mask(self, mask: torch.Tensor) -> torch.Tensor:
        # [B, max_length]: the causal mask hides what is not written yet, so ones past the prompt.
        return torch.cat([mask, mask.new_ones(len(mask), self.max_length - mask.shape[1])], 1)

    def _resize_mask(self, n: int) -> None:
        """The mask stays ``[B, max_length]``; only the cache's length moves."""

    def _call(self, kwargs: dict) -> Any:
        """The model call: compiled for the passes after the prefill when a backend is set (one-token
        steps with static shapes; wider passes, e.g. speculative verification, with dynamic ones)."""
        width = kwargs["input_ids"].shape[1]
        if self.backend is None or self.cache.get_seq_length() == 0:  # eager prefill
            return self.model(**kwargs)
        dynamic = width > 1
        compiled = self._compiled(dynamic)
        if compiled is None:
            return self.model(**kwargs)
        # A new batch shape (or, with static shapes, width) compiles again: count each first call.
        shape = (self.backend, dynamic, kwargs["input_ids"].shape[0], self.max_length, None if dynamic else width)
        warm = _state(self.model)["warm"]
        if shape in warm:
            return compiled(**kwargs)
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        start = time.perf_counter()
        try:
            out = compiled(**kwargs)
        except Exception as err:  # noqa: BLE001 — any compiler failure falls back the same way
            for layer, length in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(length)  # undo a partial write before retrying eagerly
            self._give_up(err, dynamic)
            return self.model(**kwargs)
        warm.add(shape)
        if self.stats is not None:
            self.stats.compile_seconds += time.perf_counter() - start
        return out

    def _compiled(self, dynamic: bool) -> Any:
        compiled = _state(self.model)["compiled"]
        key = (self.backend, dynamic)
        if key not in compiled:
            try:
                mode = "reduce-overhead" if self.backend == "cudagraphs" else None  # CUDA graphs via inductor
                backend = "inductor" if mode else str(self.backend)
                compiled[key] = torch.compile(self.model, backend=backend, mode=mode, dynamic=dynamic)
            except Exception as err:  # noqa: BLE001 — unknown backend, unsupported Python: fall back
                self._give_up(err, dynamic)
        return compiled[key]

    def _give_up(self, err: Exception, dynamic: bool) -> None:
        _state(self.model)["compiled"][(self.backend, dynamic)] = None
        if self.backend not in _WARNED:
            _WARNED.add(str(self.backend))
            warnings.warn(f"torch.compile (backend {self.backend!r}) is unavailable here, so generation runs "
                          f"the static cache eagerly ({type(err).__name__}: {str(err)[:200]})", stacklevel=3)
