#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run that fits a short device lease (about 10 minutes on an
# H100/H200; each step has its own time limit, so one slow case cannot eat the rest). Writes JSON and logs
# to $OUT (default ./bench-out). Run from the repo root, after `pip install -e ".[test]"` with a CUDA torch:
#     bash tools/bench/device_check.sh
set -uo pipefail
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt"

step() {  # step <name> <seconds> <command...>: run with a time limit, keep its log, never stop the script
    local name="$1" limit="$2"; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? ($(grep -cE 'it/s|lever|ratio' "$OUT/$name.log") figure lines)"
}

# framework and reference side by side, two batch sizes each
step sd15 150 python tools/bench/gpu_sd15.py --batch-sizes 1,4 --json "$OUT/sd15.json"
step sdxl 240 python tools/bench/gpu_sdxl.py --batch-sizes 1,4 --json "$OUT/sdxl.json"
# each speed lever alone vs the baseline (SD1.5, batch 4); compile last: inductor compiles for minutes
step sd15_levers 150 python tools/bench/gpu_sd15.py --batch-sizes 4 --impl framework --no-flops \
    --lever-sweep default_attention,channels_last,fused_adamw,cache_text_embeddings,cache_latents,gradient_checkpointing \
    --json "$OUT/sd15_levers.json"
step sd15_compile 120 python tools/bench/gpu_sd15.py --batch-sizes 4 --impl framework --no-flops \
    --lever-sweep compile --json "$OUT/sd15_compile.json"
grep -hE 'it/s|ratio|lever' "$OUT"/*.log
