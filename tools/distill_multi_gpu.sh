#!/usr/bin/env bash
# Distil the built-in digits model on one GPU, then on every GPU of the machine through `accelerate launch`
# (DDP over NCCL), and compare: the same batches split over the processes, so the results should agree.
#   OUT=/tmp/out bash tools/distill_multi_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distill-multi-gpu}
mkdir -p "$OUT"
gpus=${GPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}  # GPUS=2 on a CPU: a smoke run (gloo)
common=(--mode ternary --calib calibration/flux2-tiny-digits --steps 40 --batch-size 32 --checkpoint-every 20
        --eval-every 40 --eval-samples 20 --quiet --json)
start=$(date +%s.%N)
python3 -m bonsai_quant.cli distill --out /tmp/dmg-one "${common[@]}" > "$OUT/one_gpu.json"
mid=$(date +%s.%N)
python3 -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" --num_machines 1 --mixed_precision no \
    --dynamo_backend no -m bonsai_quant.cli distill --out /tmp/dmg-ddp "${common[@]}" > "$OUT/ddp.json"
end=$(date +%s.%N)
python3 - "$OUT" "$gpus" "$start" "$mid" "$end" <<'PY'
import json, sys, torch
from safetensors.torch import load_file
out, gpus, t0, t1, t2 = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
one, ddp = (json.load(open(f"{out}/{n}.json")) for n in ("one_gpu", "ddp"))
a, b = (load_file(f"/tmp/dmg-{n}/mlx/model.safetensors") for n in ("one", "ddp"))
codes = [k for k in a if a[k].dtype == torch.uint32]
differ = sum(int((a[k] != b[k]).sum()) for k in codes) / sum(a[k].numel() for k in codes)
rel = max(float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp(min=1e-12)) for k in a if k not in codes)
summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "gpus": gpus, "processes": ddp["processes"],
           "seconds_one_gpu": round(t1 - t0, 1), "seconds_ddp": round(t2 - t1, 1),
           "loss_one": one["loss"], "loss_ddp": ddp["loss"], "quality_one": one.get("quality"),
           "quality_ddp": ddp.get("quality"), "packed_code_words_differing": differ,
           "max_rel_diff_other_tensors": rel}
print(json.dumps(summary, indent=2))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
PY
