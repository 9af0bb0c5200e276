"""The CPU allocator setting a training process runs with.

glibc's malloc serves a large block from the heap once a block of its size has been freed (its
``mmap`` threshold adapts upwards, to at most 32 MiB), and freed heap memory mostly stays with the
process. A training step allocates and frees activations, gradients and logit chunks of 1-32 MiB
many times, so the resident set keeps the high-water mark of every pattern it has seen. A fixed
threshold sends every block above it to ``mmap``, which ``free`` returns to the system at once:
at the Qwen2.5-0.5B shape (4 x 1,100 tokens, checkpointing) the recipe's peak fell from 11.55 to
9.37 GB (docs/benchmarks.md, "Real scale").

It costs page faults: every block above the threshold is mapped, zeroed and unmapped again each
time. A large model does seconds of arithmetic per such block, a small one almost none: on the
digits demo's pixel lane (a 2.6M-parameter LM, 9.6 MB activations) 28% of the fine-tune's CPU
time went to the kernel. So the recipes apply it from ``LARGE_MODEL_PARAMETERS`` up, where the
retained blocks are gigabytes.
"""

from __future__ import annotations

import ctypes
import sys

import torch

M_MMAP_THRESHOLD = -3  # glibc's malloc.h; fixing it also turns the adaptive threshold off
LARGE_BLOCK_BYTES = 4 * 2**20  # small blocks stay on the fast heap path
LARGE_MODEL_PARAMETERS = 50_000_000  # below: the heap's high-water mark is small, the faults are not


def return_large_blocks_to_the_system(model: torch.nn.Module | None = None,
                                      threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix glibc's ``mmap`` threshold at ``threshold`` bytes for the rest of the process, so freed
    blocks above it leave the resident set; with ``model``, only if it has at least
    ``LARGE_MODEL_PARAMETERS`` parameters. Returns whether it was applied (also False off
    Linux/glibc, e.g. macOS, musl: their allocators are left as they are)."""
    if model is not None and sum(p.numel() for p in model.parameters()) < LARGE_MODEL_PARAMETERS:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:  # the process's own symbols: libc's, without find_library's ldconfig subprocess
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl has no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
