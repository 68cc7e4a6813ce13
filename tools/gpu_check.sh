#!/usr/bin/env bash
# The project's GPU check (one GPU, under 9 minutes): inference and training-step speed of the R50 pair, the
# inference speed with and without BatchNorm folding and with and without torch.compile (CUDA graphs), then
# 2 minutes of the COCO recipe on coco128 for CoMask and Mask R-CNN in fp32, bf16 and fp16 (six runs side by
# side on the one GPU), with loss curves, stuck/non-finite loss terms and the final COCO AP.
#
#   tools/gpu_check.sh [--out DIR] [--wheels DIR] [--data DIR] [--minutes M] [--runs DIR]
#
# --wheels: a folder of wheels for what the machine lacks (e.g. a cp312 pycocotools), installed with
# pip --no-index into a private folder. --data: a COCO folder with annotations.json and images/ (default
# ../shared/data/coco128, else .gpu_data/coco128). --minutes 0: the speed checks alone (~5 min).
# Results: DIR/gpu_check.json and DIR/*.log (DIR: $OUT or runs/gpu_check), the training runs (checkpoints)
# under --runs (default DIR/runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-runs/gpu_check}"; WHEELS=""; DATA=""; MINUTES=2; RUNS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUTDIR="$2"; shift 2;;
    --wheels) WHEELS="$2"; shift 2;;
    --data) DATA="$2"; shift 2;;
    --minutes) MINUTES="$2"; shift 2;;
    --runs) RUNS="$2"; shift 2;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2;;
  esac
done
RUNS="${RUNS:-$OUTDIR/runs}"
mkdir -p "$OUTDIR" "$RUNS"
PY="${PYTHON:-python3}"
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "$WHEELS"/*.whl || { echo "gpu_check: cannot install the wheels in $WHEELS" >&2; exit 2; }
  export PYTHONPATH="/tmp/gpu_check_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if [ -z "$DATA" ]; then
  for d in ../shared/data/coco128 .gpu_data/coco128; do [ -f "$d/annotations.json" ] && DATA="$d" && break; done
fi
[ -f "$DATA/annotations.json" ] || { echo "gpu_check: no COCO data (give --data DIR with annotations.json and images/)" >&2; exit 2; }
"$PY" -c "import torch, torchvision, pycocotools; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))" \
  || { echo "gpu_check: torch with CUDA and pycocotools are needed (give --wheels)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

echo "== inference, R50 pair, 800x1333, fp16, batch 1 and 8"
timeout 150 "$PY" -m comask bench speed --config comask_r50_mfpn_2x_coco --compare maskrcnn_r50_fpn_2x_coco \
  --size 800x1333 --device cuda --amp fp16 --repeats 20 --warmup 5 --batches 1 8 --json --out "$OUTDIR/bench" \
  --opts model.test.score_thresh=0.0 model.backbone.weights=null >"$OUTDIR/bench_infer.json" 2>>"$OUTDIR/bench.log"
echo "rc=$?"; "$PY" - "$OUTDIR/bench_infer.json" <<'PYEOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # the bench failed: its log says why
    sys.exit(f"no bench result ({e})")
for m in d.get("models", []):
    keep = {k: v for k, v in m.items() if not k.endswith("times_s") and k not in ("opts", "cpu_s")}
    print(json.dumps(keep))
PYEOF
echo "== BatchNorm folding, CoMask R50, 800x1333, fp16, batch 1: folded (default) against unfolded"
timeout 120 "$PY" -m comask bench speed --config comask_r50_mfpn_2x_coco --compare comask_r50_mfpn_2x_coco \
  --compare-opts model.test.fold_bn=false --size 800x1333 --device cuda --amp fp16 --repeats 20 --warmup 5 \
  --batches 1 --opts model.test.score_thresh=0.0 model.backbone.weights=null 2>>"$OUTDIR/bench.log" \
  | tee "$OUTDIR/bench_fold.md"
echo "rc=${PIPESTATUS[0]}"

echo "== torch.compile, CoMask R50, 800x1333, fp16, batch 1: eager (default) against reduce-overhead (CUDA graphs)"
timeout 180 "$PY" -m comask bench speed --config comask_r50_mfpn_2x_coco --compare comask_r50_mfpn_2x_coco \
  --compare-opts model.test.compile=reduce-overhead --size 800x1333 --device cuda --amp fp16 --repeats 20 \
  --warmup 5 --batches 1 --opts model.test.score_thresh=0.0 model.backbone.weights=null 2>>"$OUTDIR/bench.log" \
  | tee "$OUTDIR/bench_compile.md"
echo "rc=${PIPESTATUS[0]}"

echo "== training step, R50 pair, fp16"
timeout 75 "$PY" -m comask bench speed --train --config comask_r50_mfpn_2x_coco --compare maskrcnn_r50_fpn_2x_coco \
  --size 800x1333 --device cuda --amp fp16 --repeats 5 --warmup 2 --json --out "$OUTDIR/bench" \
  --opts model.backbone.weights=null >"$OUTDIR/bench_train.json" 2>>"$OUTDIR/bench.log"
echo "rc=$?"; tail -c 2000 "$OUTDIR/bench_train.json"; echo

if [ "$MINUTES" = 0 ]; then echo "== --minutes 0: the COCO recipe runs skipped"; exit 0; fi
echo "== the COCO recipe from scratch on $DATA, $MINUTES min each, six runs side by side"
pids=()
for model in comask_r50_mfpn_2x_coco maskrcnn_r50_fpn_2x_coco; do
  for amp in fp32 bf16 fp16; do
    tag="${model%%_*}_$amp"; a="$amp"; [ "$amp" = fp32 ] && a=null
    # the run stops itself after MINUTES (checkpoint, final COCO evaluation); timeout only guards a hang
    timeout $((MINUTES * 60 + 130)) "$PY" -m comask train --config "$model" --out "$RUNS/$tag" --opts \
      data.train.ann="$DATA/annotations.json" data.train.images="$DATA/images" \
      data.val.ann="$DATA/annotations.json" data.val.images="$DATA/images" \
      model.backbone.weights=null runtime.device=cuda runtime.amp=$a runtime.max_minutes="$MINUTES" \
      schedule.ims_per_batch=8 schedule.base_batch=8 schedule.warmup_iters=50 schedule.max_iter=100000 \
      schedule.steps=[90000] data.num_workers=2 runtime.log_period=10 runtime.progress=false \
      runtime.tensorboard=false runtime.checkpoint_period=100000 runtime.eval_batch_size=2 \
      >"$RUNS/$tag.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
for t in "$RUNS"/*.log; do echo "-- $t"; grep -v "^\s*$" "$t" | grep -i "error\|Traceback\|non-finite" | tail -3; done
tar -czf "$OUTDIR/train_logs.tar.gz" -C "$RUNS" $(cd "$RUNS" && ls *.log */log.jsonl */metrics.json 2>/dev/null)
"$PY" tools/gpu_check_report.py "$RUNS" "$OUTDIR/gpu_check.json" | tee "$OUTDIR/report.txt"
