#!/usr/bin/env bash
# The GPU checks of issue #13 in one script: under 10 minutes on one CUDA GPU.
#
#   bash benchmarks/gpu.sh                        # a CUDA GPU and a CUDA build of torch; writes $OUT
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu.sh    # the same steps at tiny shapes on CPU (a few minutes)
#
# 1. scale   bf16 fine-tune at the Qwen2.5-0.5B shape + 8192 codes, 4 x 1,100-token samples, no GC
#            (benchmarks/scale.py): recipe with our chunked loss vs the model's own loss vs TRL on t2i
#            and i2t; trained tokens/s, MFU (model FLOPs with the full head / the measured bf16 matmul
#            peak of this GPU), peak memory (max allocated); in the same table the Chameleon VQ-GAN at
#            512 px (batch 4).
# 2. gputests the `gpu`-marked tests: FSDP2 through accelerate on every GPU
#            (tests/test_finetune_launch.py::test_fsdp_on_gpus), VQ encoding on the GPU = on the CPU.
# 3. packing packed vs padded batches, ours vs TRL, bf16 (benchmarks/finetune.py). Packed rows carry
#            per-sample position_ids and no attention_mask: transformers then runs flash-attention-2's
#            varlen kernel when the model uses it, else a block-diagonal mask through SDPA; the
#            header line says whether flash_attn is installed. The model is that benchmark's small
#            one (16.5 MFLOP per token): on a GPU its steps measure per-step overhead, not kernels.
# 4. gen     one 1024-token image with CFG at the 0.5B shape: ours (eager, then static cache + CUDA
#            graphs, its warm-up apart) vs transformers' generate. Last: the step a cut run loses.
# Each step has its own time limit; a failed or timed-out step does not stop the others. Logs go to
# $OUT/<step>.log (default outputs/gpu_check), the tables to $OUT/scale.md and $OUT/gen.md, and the
# summary at the end lists every step's exit status and time. On an H200 (2026-12-04) the VQ-GAN
# and the six LM rows took 170 s after the preparation, gputests 49 s, packing about 85 s; gen
# inside the scale step did not finish within that step's 350 s.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The clone importable without an install (a GPU machine's own Python), before what PYTHONPATH holds.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    SCALE=(--quick --threads 1 --steps 3)
    FINETUNE=(--steps 3 --repeats 1 --threads 1 --precisions no)
    SLOWER=3  # a shared CPU: the limits below are for a GPU
else
    # The host's memory, not the GPU's, is what the limit watches; a fresh GPU machine may report
    # little available before it grows.
    SCALE=(--precision bf16 --steps 8 --memory_limit_gb 64)
    FINETUNE=(--steps 10 --repeats 1 --precisions bf16)
    SLOWER=1
fi

declare -a SUMMARY
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, keep its status
    local name=$1 limit=$(($2 * SLOWER))
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    SUMMARY+=("$name: exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (time limit)') in $((SECONDS - start)) s")
    tail -n 30 "$OUT/$name.log"
}

"$PY" - <<'EOF' | tee "$OUT/device.txt"
import importlib.util, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (dry run)"
attention = "flash_attn installed" if importlib.util.find_spec("flash_attn") else "no flash_attn: SDPA"
print(f"{gpu}; torch {torch.__version__}; transformers {transformers.__version__}; {attention}")
EOF

step scale 230 "$PY" benchmarks/scale.py "${SCALE[@]}" --out "$OUT/scale.md" --only vq-b4 \
    lm-full-nogc-t2i-ours lm-full-nogc-t2i-model lm-full-nogc-i2t-ours lm-full-nogc-i2t-model \
    lm-full-nogc-i2t-trl
# The two files named: collecting all of tests/ imports packages a GPU machine may lack (gradio, ...).
step gputests 70 "$PY" -m pytest tests/test_finetune_launch.py tests/test_data.py -m gpu -q -rs -p no:cacheprovider
step packing 100 "$PY" benchmarks/finetune.py "${FINETUNE[@]}" --root "$OUT/bench_finetune"
step gen 190 "$PY" benchmarks/scale.py "${SCALE[@]}" --out "$OUT/gen.md" --only gen

echo "== summary ($(cat "$OUT/device.txt"))"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
