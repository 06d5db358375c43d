#!/bin/bash
# Issue #28's GPU comparison in one call, within WALL seconds (default 540: nine minutes):
#   1. the 100-client CIFAR-10 CNN round (1 epoch, batch 32, every client) in fp32, through
#      Flower messages (`fedimb`), beside the vectorised trainer alone (`vmap`) and the
#      vectorised step's ceiling on synthetic data already on the GPU (`limit`);
#   2. the same in bf16 with cuDNN autotuning;
#   3. the ResNet-32 (GroupNorm) round in fp32, `fedimb` beside `limit`;
#   4. pfl-research's CIFAR-10 benchmark workload (1,000 clients of 50 images, 50 a round,
#      batch 10, their CNN, central evaluation every 10 rounds) for PFL_ROUNDS rounds
#      (default 100): fedimb vectorised and pfl==0.6.0, same data, partition, cohorts and
#      initial weights (benchmarks/bench_pfl.py).
# Each step has its own time limit (cut to what WALL leaves) and writes its JSON to $OUT as
# it goes; the whole log is $OUT/gpu-round-limit.log. Commit $OUT's files under
# benchmarks/results/.
#
# Here, once (flwr, pfl and their missing dependencies as wheels, ~10 MB; the JPEGs, 20 MB):
#   P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
#      --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64"
#   pip download -q --no-deps $P -d .whl flwr==1.42.0 cryptography cffi pycryptodome iterators \
#     grpcio-health-checking pfl==0.6.0 dp-accounting==0.5.1 prv-accountant==0.2.0 \
#     multiprocess==0.70.19 dill==0.4.1 dm-tree==0.1.10
#   tar czf .data/cifar10-jpeg.tgz -C ../shared/data cifar10-jpeg
# On the device (carry .whl and .data):
#   DATA=.data/cifar10-jpeg.tgz bash benchmarks/gpu_round_limit.sh
# A dry run on a CPU (a few minutes):
#   PATH=<venv with flwr>/bin:$PATH PFL_PYTHON=<venv with pfl>/bin/python DEVICE=cpu TINY=60 \
#     CLIENTS=10 ROUNDS=2 PFL_ROUNDS=2 PFL_CLIENTS=12 PFL_COHORT=4 PFL_EVAL=2 MODELS_ONLY=1 \
#     DATA=../shared/data/cifar10-jpeg bash benchmarks/gpu_round_limit.sh
#
# Env: DATA (the cifar10-jpeg tree or a .tgz of it), DEVICE (cuda), WALL (540), OUT
# (/tmp/out), ROUNDS (6: rounds of steps 1-3), CLIENTS (100), PFL_ROUNDS (100), PFL_CLIENTS
# (1000), PFL_COHORT (50), PFL_EVAL (10), STEPS ("cnn bf16 resnet pfl"), TINY (N: a copy
# of DATA with its first N train and N/5 test images per class: a dry run), MODELS_ONLY
# (1: steps 1-3 run `fedimb` and `limit` only, no `vmap`: a shorter dry run),
# PFL_PYTHON (the interpreter with pfl; default python3 with the wheels).
set -u
DEVICE=${DEVICE:-cuda}; WALL=${WALL:-540}; OUT=${OUT:-/tmp/out}; DATA=${DATA:?set DATA}
ROUNDS=${ROUNDS:-6}; CLIENTS=${CLIENTS:-100}; PFL_ROUNDS=${PFL_ROUNDS:-100}
PFL_CLIENTS=${PFL_CLIENTS:-1000}; PFL_COHORT=${PFL_COHORT:-50}; PFL_EVAL=${PFL_EVAL:-10}
STEPS=" ${STEPS:-cnn bf16 resnet pfl} "; TINY=${TINY:-}; MODELS_ONLY=${MODELS_ONLY:-}
START=$SECONDS
mkdir -p "$OUT"
LOG="$OUT/gpu-round-limit.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import flwr" 2>/dev/null; then  # the device: neither
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
PFL_PYTHON=${PFL_PYTHON:-python3}
ROOT=/tmp/fedimb-data/cifar10-jpeg${TINY:+-tiny$TINY}
if [ ! -d "$ROOT" ]; then
  mkdir -p "$ROOT"
  if [ -f "$DATA" ]; then
    tar xzf "$DATA" -C "$ROOT" --strip-components 1 || exit 4
  else
    cp -r "$DATA"/. "$ROOT" || exit 4
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
# FEDIMB_CACHE: a tiny copy must not share the full data's decoded cache.
export FEDIMB_CACHE=/tmp/fedimb-cache${TINY:+-tiny$TINY}
left() { echo $((WALL - (SECONDS - START))); }
limit() { local l; l=$(left); l=$((l - 15)); [ "$1" -lt "$l" ] && l=$1; echo $l; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
B="python3 benchmarks/bench_round.py --device $DEVICE --dataset cifar10 --data-root $ROOT"
B="$B --rounds $ROUNDS --clients $CLIENTS"
S=fedimb,vmap,limit; [ -n "$MODELS_ONLY" ] && S=fedimb,limit
step() {  # name, seconds wanted, command...
  local name=$1 want=$2; shift 2
  local t; t=$(limit "$want")
  if [ "$t" -lt 30 ]; then echo "== $name: skipped, $(left) s of WALL left"; return; fi
  echo "== $name (limit ${t} s, $(left) s of WALL left)"
  timeout "$t" "$@" 2>&1 | grep -v "^running "
}
if [[ $STEPS == *" cnn "* ]]; then
  step "cnn fp32" 110 $B --model cnn --settings $S --timeout 90 --out "$OUT/gpu-cnn-fp32-limit.json"
fi
if [[ $STEPS == *" bf16 "* ]]; then
  step "cnn bf16" 110 $B --model cnn --settings $S --precision bf16 --cudnn-benchmark \
    --timeout 90 --out "$OUT/gpu-cnn-bf16-limit.json"
fi
if [[ $STEPS == *" resnet "* ]]; then
  step "resnet32 fp32" 130 $B --model resnet32 --settings fedimb,limit --timeout 110 \
    --out "$OUT/gpu-resnet32-fp32-limit.json"
fi
if [[ $STEPS == *" pfl "* ]]; then
  step "pfl workload" 600 python3 benchmarks/bench_pfl.py --device "$DEVICE" \
    --rounds "$PFL_ROUNDS" --clients "$PFL_CLIENTS" --cohort "$PFL_COHORT" \
    --eval-every "$PFL_EVAL" --data-root "$ROOT" --fedimb-batched on \
    --pfl-python "$PFL_PYTHON" --out "$OUT/gpu-pfl.json"
fi
echo "== done in $((SECONDS - START)) s"
