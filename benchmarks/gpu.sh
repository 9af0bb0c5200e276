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
#            512 px (batch 4) and one 1024-token image with CFG, ours vs transformers' generate.
# 2. fsdp    FSDP2 through accelerate on every GPU (tests/test_finetune_launch.py::test_fsdp_on_gpus).
# 3. packing packed vs padded batches, ours vs TRL, bf16 (benchmarks/finetune.py). Packed rows carry
#            per-sample position_ids and no attention_mask: transformers then runs flash-attention-2's
#            varlen kernel when the model uses it, else a block-diagonal mask through SDPA; the
#            header line says whether flash_attn is installed.
# Each step has its own time limit; a failed or timed-out step does not stop the others. Logs go to
# $OUT/<step>.log (default outputs/gpu_check), the scale table to $OUT/scale.md, and the summary at
# the end lists every step's exit status and time.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    SCALE=(--quick --threads 1 --steps 3)
    FINETUNE=(--steps 3 --repeats 1 --threads 1 --precisions no)
    SLOWER=3  # a shared CPU: the limits below are for a GPU
else
    SCALE=(--precision bf16 --steps 8 --gen_hf_tokens 0)
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
import importlib.util, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (dry run)"
attention = "flash_attn installed" if importlib.util.find_spec("flash_attn") else "no flash_attn: SDPA"
print(f"{gpu}; torch {torch.__version__}; {attention}")
EOF

step scale 330 "$PY" benchmarks/scale.py "${SCALE[@]}" --out "$OUT/scale.md" --only vq-b4 \
    lm-full-nogc-t2i-ours lm-full-nogc-t2i-model lm-full-nogc-i2t-ours lm-full-nogc-i2t-model \
    lm-full-nogc-i2t-trl gen
step fsdp 120 "$PY" -m pytest tests/test_finetune_launch.py -m gpu -k fsdp -q -rs -p no:cacheprovider
step packing 120 "$PY" benchmarks/finetune.py "${FINETUNE[@]}" --root "$OUT/bench_finetune"

echo "== summary ($(cat "$OUT/device.txt"))"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
