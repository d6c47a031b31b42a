#!/usr/bin/env bash
# docs/serving.md end to end with a CPU cut: the page's four `sidetune train` commands plus
# --train-limit 16 --val-limit 16 --test-split none --epochs 1 --threads 1, then `sidetune serve` on the
# adapters and the page's curl calls; ends with the service's exit status on SIGTERM. Work folder: $1
# (default /tmp/sidetune-serve-check). Skips with a message when ../shared/assets is absent.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
A="$REPO/../shared/assets"
W="$A/weights/vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
D="$A/data"
if [ ! -f "$W" ]; then echo "skipping: $W is absent (../shared/assets is not here)"; exit 0; fi
S="$REPO/.venv/bin/sidetune"
WORK="${1:-/tmp/sidetune-serve-check}"
PORT="${PORT:-8765}"
CUT="--train-limit 16 --val-limit 16 --test-split none --epochs 1 --threads 1"
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
start=$(date +%s)
$S train vit_small_patch14_dinov2 losa --weights "$W" --img-size 224 --data "$D/cifar10-1k" --val-fraction 0.2 $CUT --output runs/cifar10
$S train vit_small_patch14_dinov2 losa --weights "$W" --img-size 224 --data "$D/sign-digits" --val-fraction 0.2 $CUT --output runs/digits
$S train vit_small_patch14_dinov2 e3va --task segmentation --weights "$W" --img-size 224 --data "$D/camvid-240x180" \
    --layout camvid --batch-size 8 --head-opt channels=64 $CUT --output runs/camvid
$S train vit_small_patch14_dinov2 losa --task detection --detector faster_rcnn --weights "$W" --img-size 224 \
    --data "$D/bccd" --layout voc --batch-size 8 --head-opt fpn_channels=64 --head-opt box_head_dim=256 $CUT --output runs/bccd
echo "trained the four adapters in $(( $(date +%s) - start )) s"
$S serve runs/cifar10/best runs/digits/best runs/camvid/best runs/bccd/best --port "$PORT" --threads 1 > serve.log 2>&1 &
PID=$!
for _ in $(seq 180); do curl -sf "localhost:$PORT/health" > /dev/null && break; sleep 1; done
IMG=$(find "$D/bccd" -name "*.jpg" | head -1)
curl -sf "localhost:$PORT/health"; echo
curl -sf "localhost:$PORT/tasks" | head -c 400; echo
curl -sf -F "file=@$IMG" "localhost:$PORT/predict" | head -c 400; echo
curl -sf -F "file=@$IMG" "localhost:$PORT/predict?tasks=cifar10,digits&top_k=2" | head -c 400; echo
curl -sf "localhost:$PORT/metrics" | head -c 400; echo
kill -TERM $PID
wait $PID && echo "serve exited with status 0"
