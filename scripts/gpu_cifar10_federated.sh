#!/bin/bash
# One slice of the CIFAR-10 results ledger (issue #23) on a lent GPU machine: as many
# cells of SWEEP as fit in BUDGET_S seconds, WORKERS at a time on the one GPU. Each
# worker is a `fedimb sweep` bounded by `timeout`, all in one folder that starts as a
# copy of the committed ledger: a committed cell is done (no checkpoint needed), and
# each other cell is run by the worker that claims it first. The cells completed (or
# failed) come back as $OUT/cells.tgz without checkpoints or per-client logs, beside
# report.md and the log. Rerun it to go on: the cells brought back and unpacked into
# the ledger (committed or not: the working tree travels) are skipped.
#
# Here, once (ignored folders, about 29 MB together, under the 64 MiB that travels):
#   mkdir -p .data && tar czf .data/cifar10-jpeg.tgz -C ../shared/data cifar10-jpeg
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl flwr==1.42.0 cryptography==50.0.2 \
#     cffi==2.1.1 pycparser==3.12 grpcio-health-checking==1.81.1 iterators==0.0.2 \
#     pycryptodome==3.24.1
# There (the device tool's run: carry [".data", ".whl"], timeout_s 600):
#   bash scripts/gpu_cifar10_federated.sh
# Back here (files_at: where the reply put $OUT's files):
#   tar xzf <files_at>/cells.tgz -C docs/results/cifar10-federated/cifar10-fedavg
#   fedimb report docs/results/cifar10-federated/cifar10-fedavg    # then commit
#
# Env (defaults): SWEEP (configs/science/cifar10-fedavg.toml); ONLY, space-separated
# KEY=VALUE cell filters ("partition.classes-per-client=2 seed=0": the first slice);
# WORKERS (3); BUDGET_S (540: the workers' wall time, from the script's start); DATA
# (.data/cifar10-jpeg.tgz, or the tree itself); LEDGER (docs/results/cifar10-federated/
# <sweep name>); EXTRA (more `fedimb sweep` arguments, e.g. "--set precision=bf16" once
# bf16 is shown equal within seed noise); OUT (/tmp/out).
set -u
START=$(date +%s)
SWEEP=${SWEEP:-configs/science/cifar10-fedavg.toml}
ONLY=${ONLY-partition.classes-per-client=2 seed=0}
WORKERS=${WORKERS:-3}; BUDGET_S=${BUDGET_S:-540}; DATA=${DATA:-.data/cifar10-jpeg.tgz}
EXTRA=${EXTRA:-}; OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"; LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

if [ -d .whl ] && ! python3 -c "import flwr" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -f "$DATA" ]; then
  rm -rf /tmp/data && mkdir -p /tmp/data && tar xzf "$DATA" -C /tmp/data || exit 4
  DATA=$(find /tmp/data -mindepth 1 -maxdepth 1 -type d | head -1)
fi
[ -d "$DATA/train" ] || { say "no image-folder tree at $DATA (see the header)"; exit 4; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee -a "$LOG"
read -r NAME BASE < <(python3 -c "from fedimb.sweep import load_sweep as l; s = l('$SWEEP'); \
print(s.name, s.base)") || exit 5
LEDGER=${LEDGER:-docs/results/cifar10-federated/$NAME}
WORK=/tmp/ledger/$NAME
rm -rf "$WORK"; mkdir -p "$WORK"
[ -d "$LEDGER" ] && cp -r "$LEDGER/." "$WORK/"
ARGS=(--out "$WORK" --set "data-root=$DATA" --set cudnn-benchmark=true -q)
for kv in $ONLY; do ARGS+=(--only "$kv"); done
# shellcheck disable=SC2206  # EXTRA is a list of words on purpose
ARGS+=($EXTRA)
say "sweep $SWEEP ($NAME), only: ${ONLY:-all cells}, $WORKERS workers, ledger $LEDGER"

# Decode the images once (the on-disk cache), not once per worker.
python3 -m fedimb.cli partitions --config "$BASE" --set "data-root=$DATA" \
  --png /tmp/partitions.png >/dev/null || exit 6
say "data ready"

BEFORE=$(grep -l '"status": "completed"' "$WORK"/*/summary.json 2>/dev/null | wc -l)
W_START=$(date +%s)
for k in $(seq "$WORKERS"); do
  left=$((START + BUDGET_S - $(date +%s)))
  [ "$left" -gt 30 ] || break
  timeout -k 20 "$left" python3 -m fedimb.cli sweep "$SWEEP" "${ARGS[@]}" \
    >"/tmp/worker-$k.log" 2>&1 &
  sleep 3  # each worker claims its first cell before the next starts
done
wait
W_S=$(($(date +%s) - W_START))
for f in /tmp/worker-*.log; do echo "== $f"; cat "$f"; done >>"$LOG"
say "workers done after $W_S s"

# Keep what is worth a ledger row: completed or failed cells; an interrupted one's
# checkpoint does not come back, so it runs again next time. sweep.json then says what
# the folder holds (a worker stopped by its timeout left its cell "interrupted").
python3 - "$WORK" "$BEFORE" "$W_S" <<'PY' | tee -a "$LOG"
import shutil, sys
from pathlib import Path
from fedimb.results import atomic_write_json, read_json

work, before, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
state = read_json(work / "sweep.json")
for cell in state["cells"]:
    summary = read_json(work / cell["name"] / "summary.json") or {}
    cell["status"] = summary.get("status", "pending")
    if cell["status"] not in ("completed", "failed"):
        cell["status"] = "pending"
        shutil.rmtree(work / cell["name"], ignore_errors=True)
atomic_write_json(work / "sweep.json", state)
count = {s: sum(c["status"] == s for c in state["cells"]) for s in ("completed", "failed")}
new = count["completed"] - before
print(f"cells: {new} completed in this call ({60 * new / max(seconds, 1):.2f} per GPU-minute "
      f"of the workers' {seconds} s), {count['completed']} of {len(state['cells'])} in all, "
      f"{count['failed']} failed")
PY
python3 -m fedimb.cli report "$WORK" >/dev/null && cp "$WORK/report.md" "$OUT/"
tar czf "$OUT/cells.tgz" -C "$WORK" --exclude=checkpoint.pt --exclude=clients.jsonl . || exit 7
say "cells.tgz: $(du -h "$OUT/cells.tgz" | cut -f1); wall $(($(date +%s) - START)) s"
