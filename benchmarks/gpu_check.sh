#!/usr/bin/env bash
# Issue 13's GPU part in one run, for a lent GPU machine (the `device` tool's `run`; the bench is
# most of it; not yet run on a GPU, so its time there is not known: the CPU smoke test below is 80 s):
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh
#
# Smoke test on a CPU (tiny sizes, no fp16, gloo in place of nccl; about 80 s on 2 cores):
#
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# It writes six files under $OUT (the device tool brings back at most 8, 2 folders down):
#   device.txt      torch, CUDA, the GPU and whether it multiplies bf16 natively
#   bench.json      benchmarks/bench.py on the device: training float32/bf16/autocast, beam search,
#   bench.txt       the encoders (VGG-19 conv5_4 at 224 px: the paper's images/s) and whole
#                   epochs (the feature cache against image batches and an encoding per caption)
#   amp_bf16.jsonl  a short training on the shapes set with train.amp=bf16 / fp16 on the device:
#   amp_fp16.jsonl  its metrics.jsonl (loss at each logged step, validation per epoch, minutes)
#   ddp.jsonl       the bf16 run again under torchrun, one process a GPU (nccl; gloo on a CPU)
# Offline throughout: the shapes set is generated, the encoders run with random weights
# (configs/shapes_soft_random_encoder.yaml; speed does not depend on the weights).
set -euo pipefail
out=${OUT:-gpu_check}
device=${DEVICE:-cuda}
quick=${QUICK:+--quick}
work=$(mktemp -d)  # run folders (checkpoints) stay out of $OUT
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python - <<'PY' | tee "$out/device.txt"
import platform, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| python", platform.python_version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.device_count(), "x", p.name, f"{p.total_memory / 2**30:.0f} GiB", "| bf16", torch.cuda.is_bf16_supported())
else:
    print("no CUDA device:", platform.processor() or platform.machine())
PY

python benchmarks/bench.py --device "$device" $quick --out "$out/bench.json" 2>&1 | tee "$out/bench.txt"

# short runs on a small shapes set (600 images, 3,000 captions; the first run generates it): the
# AMP paths and DDP end to end
epochs=${EPOCHS:-2}
train() {  # train NAME AMP COMMAND...: one run; its metrics.jsonl copied to $OUT/NAME.jsonl
    local name=$1 amp=$2
    shift 2
    "$@" configs/shapes_soft_random_encoder.yaml --quiet data.root="$work/shapes" data.shapes.n=600 train.device="$device" \
        train.epochs="$epochs" train.max_minutes=0 train.amp="$amp" train.out_dir="$work/$name"
    cp "$work/$name/metrics.jsonl" "$out/$name.jsonl"
}
train amp_bf16 bf16 captioner train
if [ "$device" != cpu ]; then  # fp16 needs a GPU (and its gradient scaler)
    train amp_fp16 fp16 captioner train
fi
gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1) if '$device' != 'cpu' else 2)")
train ddp bf16 torchrun --standalone --nproc_per_node="$gpus" -m captioner.cli train

python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.jsonl")):
    epochs = [r for r in map(json.loads, f.read_text().splitlines()) if "val_cider" in r]
    for r in epochs:
        print(f"{f.stem:9} epoch {r['epoch']}: train xent {r['train_xent']:.3f}  val CIDEr-D {r['val_cider']:.3f}  "
              f"{r['minutes']:.2f} min")
PY
rm -rf "$work"
