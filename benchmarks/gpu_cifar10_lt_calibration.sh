#!/bin/bash
# The CIFAR-10-LT calibration (configs/cifar10-lt-calibration.toml) on one GPU: the sweep's
# six cells as concurrent processes, each under one time limit so that the whole script
# ends within WALL seconds (default 540: nine minutes), then its results packed under
# $OUT. Every cell checkpoints every round: run the script again (with the packed results
# of the last call, RESUME_FROM) and each cell continues where it stopped; completed cells
# are left alone. The folder is a sweep folder: `fedimb report` (run here at the end) or
# `fedimb sweep <sweep file> --out <it>` read and continue it.
#
# Here, once (20 MB of JPEGs and ~8.5 MB of flwr's wheels travel; the device has no flwr):
#   tar czf .data/cifar10-jpeg.tgz -C ../shared/data cifar10-jpeg
#   pip download ... -d .whl flwr==1.42.0 cryptography cffi pycryptodome iterators \
#     grpcio-health-checking                      (see ../.library/device/README.md)
# On the device (carry .data and .whl; for a rerun also the folder of the last call's
# files, e.g. .calib, and RESUME_FROM=.calib):
#   DATA=.data/cifar10-jpeg.tgz bash benchmarks/gpu_cifar10_lt_calibration.sh
# Back here, unpack $OUT/<sweep name>.tgz and run `fedimb report` on it.
#
# Env: SWEEP (configs/cifar10-lt-calibration.toml), DATA (the cifar10-jpeg tree or a .tgz
# of it), DEVICE (cuda), PRECISION (fp32; bf16 is a results-changing key), WALL (540),
# WORK (/tmp/calibration: cells, logs; the data go to /tmp/fedimb-data), RESUME_FROM (a folder with the last call's
# <name>.tgz and <name>-checkpoints.tgz.* files), SET (extra "key=value ..." overrides of
# every cell, e.g. for a dry run "num-rounds=2 lr-schedule.warmup-rounds=1"), TINY (N:
# train on a copy of DATA with only its first N images per class, N/5 test: a dry run),
# THREADS (2 per cell; 1 on a small CPU, where more spin against each other), CELL_LIMIT
# (seconds per cell instead of what WALL leaves).
set -u
SWEEP=${SWEEP:-configs/cifar10-lt-calibration.toml}; DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-}; WALL=${WALL:-540}; WORK=${WORK:-/tmp/calibration}
OUT=${OUT:-/tmp/out}; DATA=${DATA:?set DATA to the cifar10-jpeg tree or a .tgz of it}
SET=${SET:-}; TINY=${TINY:-}; RESUME_FROM=${RESUME_FROM:-}
START=$SECONDS
mkdir -p "$OUT" "$WORK/logs"
THREADS=${THREADS:-2}  # per cell; six cells on 16 cores
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 OMP_NUM_THREADS=$THREADS
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import flwr" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
# One data path in every call (not under WORK): a resumed cell reads its own config.
ROOT=/tmp/fedimb-data/cifar10-jpeg
if [ ! -d "$ROOT" ]; then
  mkdir -p "${ROOT%/*}"
  if [ -f "$DATA" ]; then
    tar xzf "$DATA" -C "${ROOT%/*}" || exit 4
    top=$(tar tzf "$DATA" | head -1 | cut -d/ -f1)
    [ "$top" = cifar10-jpeg ] || mv "${ROOT%/*}/$top" "$ROOT"
  else
    cp -r "$DATA" "$ROOT" || exit 4
  fi
  if [ -n "$TINY" ]; then  # a dry run: the first TINY train, TINY/5 test images per class
    for split in train test; do
      n=$TINY; [ $split = test ] && n=$((TINY / 5))
      for d in "$ROOT/$split"/*/; do
        ls "$d" | sort | tail -n +$((n + 1)) | sed "s|^|$d|" | xargs -r rm -f
      done
    done
  fi
fi
NAME=$(python3 -c "from fedimb.sweep import load_sweep; print(load_sweep('$SWEEP').name)") || exit 5
CELLS=$WORK/$NAME
if [ -n "$RESUME_FROM" ] && [ ! -d "$CELLS" ] && [ -f "$RESUME_FROM/$NAME.tgz" ]; then
  tar xzf "$RESUME_FROM/$NAME.tgz" -C "$WORK" || exit 6
  if ls "$RESUME_FROM/$NAME"-checkpoints.tgz.* >/dev/null 2>&1; then
    cat "$RESUME_FROM/$NAME"-checkpoints.tgz.* | tar xz -C "$WORK" || exit 6
  fi
  echo "resuming from $RESUME_FROM"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, flwr; print('torch', torch.__version__, 'flwr', flwr.__version__)"

# The cells (name, then the run's --set arguments) and sweep.json, as `fedimb sweep`
# with --set would write them; the device's own keys join every cell's overrides.
EXTRA="data-root=\"$ROOT\" device=\"$DEVICE\" threads=$THREADS $SET"
[ -n "$PRECISION" ] && EXTRA="$EXTRA precision=\"$PRECISION\""
python3 - "$SWEEP" "$CELLS" $EXTRA >"$WORK/cells.txt" <<'EOF' || exit 5
import dataclasses, json, sys
from pathlib import Path
from fedimb.config import parse_overrides
from fedimb.results import SUMMARY_FILE, SWEEP_FILE, atomic_write_json, read_json
from fedimb.sweep import expand, load_sweep

sweep, out = load_sweep(sys.argv[1]), Path(sys.argv[2])
sweep = dataclasses.replace(sweep, fixed={**sweep.fixed, **parse_overrides(sys.argv[3:])})
cells = expand(sweep)
out.mkdir(parents=True, exist_ok=True)
status = [(read_json(out / c.name / SUMMARY_FILE) or {}).get("status", "pending") for c in cells]
atomic_write_json(out / SWEEP_FILE, {
    "sweep": sweep.to_json(),
    "cells": [
        {"name": c.name, "overrides": c.overrides, "status": s}
        | ({"method": c.method} if c.method else {})
        for c, s in zip(cells, status)
    ],
})
for c in cells:
    print(c.name, *(f"{k}={json.dumps(v)}" for k, v in c.overrides.items()), sep="\t")
EOF

# Warm the decoded-dataset cache once, so the cells do not all decode the JPEGs at once.
python3 -c "from fedimb.data.datasets import load_dataset; load_dataset('imagefolder', '$ROOT')" \
  || exit 7
LIMIT=${CELL_LIMIT:-$((WALL - (SECONDS - START) - 45))}  # 45 s left to pack and report
[ $LIMIT -gt 30 ] || { echo "no time left for the cells ($LIMIT s)"; exit 8; }
BASE=$(python3 -c "from fedimb.sweep import load_sweep; print(load_sweep('$SWEEP').base)")
echo "== $(wc -l <"$WORK/cells.txt") cells, at most $LIMIT s each, into $CELLS"
while IFS=$'\t' read -r cell overrides; do
  dir=$CELLS/$cell
  if grep -qs '"status": "completed"' "$dir/summary.json"; then
    echo "$cell: completed before"; continue
  fi
  if [ -f "$dir/config.toml" ]; then
    args=(--resume "$dir")
  else
    args=(--config "$BASE" --out "$dir")
    IFS=$'\t' read -r -a kv <<<"$overrides"
    for s in "${kv[@]}"; do args+=(--set "$s"); done
  fi
  # SIGTERM first: the run records itself as interrupted, resumable from its checkpoint.
  timeout -k 20 "$LIMIT" python3 -m fedimb.cli run -q "${args[@]}" </dev/null \
    >"$WORK/logs/$cell.log" 2>&1 &
done <"$WORK/cells.txt"
wait
echo "== cells done after $((SECONDS - START)) s"

# sweep.json's statuses, the report, then what comes back (at most 8 files under $OUT).
python3 - "$CELLS" <<'EOF'
import sys
from pathlib import Path
from fedimb.results import SUMMARY_FILE, SWEEP_FILE, atomic_write_json, read_json

out = Path(sys.argv[1])
data = read_json(out / SWEEP_FILE)
for cell in data["cells"]:
    summary = read_json(out / cell["name"] / SUMMARY_FILE) or {}
    cell["status"] = summary.get("status", "missing")
    print(f"{cell['name']}: {cell['status']}, round {summary.get('rounds_completed')}, "
          f"final balanced error {summary.get('final_balanced_error')}")
atomic_write_json(out / SWEEP_FILE, data)
EOF
timeout 60 python3 -m fedimb.cli report "$CELLS" >"$WORK/logs/report.log" 2>&1 \
  && cp "$CELLS/report.md" "$CELLS/report.csv" "$OUT/" \
  || echo "report failed (see report.log): run fedimb report on the unpacked folder"
for f in "$WORK"/logs/*.log; do echo "== $(basename "$f")"; tail -n 15 "$f"; done >"$OUT/log.txt"
tar czf "$OUT/$NAME.tgz" --exclude=checkpoint.pt -C "$WORK" "$NAME"
# Checkpoints of unfinished cells only (a completed cell needs none), in 15 MB parts.
unfinished=$(cd "$WORK" && for d in "$NAME"/*/; do
  grep -qs '"status": "completed"' "$d/summary.json" || ls "$d"checkpoint.pt 2>/dev/null
done)
rm -f "$OUT/$NAME"-checkpoints.tgz.*
[ -n "$unfinished" ] && (cd "$WORK" && tar cz $unfinished) \
  | split -b 15M -d - "$OUT/$NAME-checkpoints.tgz."
ls -la "$OUT"
echo "== $((SECONDS - START)) s in all"
