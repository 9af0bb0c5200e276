"""Parts every training recipe shares: config parsing, the Accelerator, checkpoints, the loop.

Recipes (``unimodal/recipes/*.py``) stay linear scripts; the mechanics that must be right once
live here:

- `config`: ``parse_config`` (typed dataclasses from a YAML file or a shipped config's name, plus
  ``--key value`` and ``--section.key value`` overrides), ``RunArguments`` (the run arguments
  every training recipe extends), ``shipped_configs``.
- `accelerator`: ``make_accelerator`` (gloo on CPU, else DeepSpeed silently runs as one process;
  a seedable sampler, so a resumed run sees exactly the batches an uninterrupted one would; ZeRO
  bucket sizes from the model's hidden size), ``weights_sharded``, ``zero3_disabled``,
  ``gather_zero3_into`` (a ZeRO-3 model's weights into a plain copy, one parameter at a time).
- `checkpoints`: ``CheckpointManager`` (state written to a temporary folder, then renamed, so a
  crash mid-save never leaves a half checkpoint a relaunch would resume from), ``check_finite``.
- `resume`: ``check_resumable`` (same config, a process count the run can continue from),
  ``CheckpointError``.
- `signals`: ``Preemption`` (SIGTERM / SIGUSR1: finish the step, checkpoint, exit with
  ``PREEMPTED_EXIT_CODE`` 75), ``Preempted``.
- `loop`: ``infinite_batches`` (exact mid-epoch resume), ``cosine_with_warmup``, ``Throughput``,
  ``adamw`` (torch's fused AdamW where the parameters allow it), ``step_in_backward`` (each
  parameter stepped as soon as its gradient is complete; ``check_step_in_backward`` says where not).
- `allocator`: ``return_large_blocks_to_the_system`` (glibc keeps freed heap blocks: a fixed
  ``mmap`` threshold returns them, several GB at real shapes; models from 50M parameters up).
- `loss`: ``causal_lm_loss`` (the LM head only where a loss is taken, in chunks), ``batch_loss``.
- `mlp_chunks`: ``chunk_mlps`` (checkpointed MLPs recompute their backward a chunk of tokens at a
  time: no [N, intermediate] tensors, no extra forward).
"""

from .accelerator import gather_zero3_into, make_accelerator, weights_sharded, zero3_disabled
from .allocator import return_large_blocks_to_the_system
from .checkpoints import CheckpointManager, CheckpointSpaceError, NonFiniteLossError, check_finite
from .config import RunArguments, parse_config, resolve_config, shipped_configs
from .loop import Throughput, adamw, check_step_in_backward, cosine_with_warmup, infinite_batches, step_in_backward
from .loss import LOSS_METHODS, batch_loss, batch_loss_sums, causal_lm_loss
from .mlp_chunks import chunk_mlps
from .resume import CheckpointError, continued_micro_step
from .signals import PREEMPTED_EXIT_CODE, Preempted, Preemption

__all__ = [
    "LOSS_METHODS", "PREEMPTED_EXIT_CODE", "CheckpointError", "CheckpointManager", "CheckpointSpaceError",
    "NonFiniteLossError", "Preempted", "Preemption", "RunArguments", "Throughput", "batch_loss",
    "adamw", "batch_loss_sums", "causal_lm_loss", "check_finite", "check_step_in_backward", "chunk_mlps",
    "continued_micro_step",
    "cosine_with_warmup", "infinite_batches", "step_in_backward",
    "make_accelerator", "parse_config", "resolve_config", "return_large_blocks_to_the_system", "shipped_configs",
    "weights_sharded", "zero3_disabled", "gather_zero3_into",
]
