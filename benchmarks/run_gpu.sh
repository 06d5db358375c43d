#!/bin/bash
# The GPU checks of a short device session: the CUDA tests, a probe of the vectorised
# convolution kernels (benchmarks/conv_kernels.py), the profile of a vectorised round
# (with a torch.profiler table and group sizes 50 and 25), the round benchmark in fp32
# (every setting) per model, then bf16 with cuDNN autotuning for the fast settings,
# then the stock loop fed as Flower's quickstart feeds it (PIL images, transformed per
# sample), and the server's FedAvg mean on the host's cores (Flower's and fedimb's). Each
# step has its own time limit and writes its JSON as it goes, so a session cut short keeps
# what it measured. All steps take about 15 minutes on an H200: pick some with STEPS, e.g.
# STEPS="tests profile" then STEPS="bench bf16" in a second call.
#
#   DATA=path/to/cifar10-jpeg OUT=results-dir bash benchmarks/run_gpu.sh
#
# DATA may instead be a .tgz of that tree (unpacked to /tmp). Where flwr is not installed
# but wheels are in .whl/ (see ../.library/device/README.md), they are installed to
# /tmp/site first. Env: DEVICE (cuda), ROUNDS (6: the mean of rounds 2-R dilutes one-off
# costs such as round 2's new pinned buffers), CLIENTS (100), MODELS ("cnn resnet32"),
# STEPS ("tests kernels profile bench bf16 quickstart aggregate"), SETTINGS (fp32 bench settings,
# default all).
set -u
DEVICE=${DEVICE:-cuda}; ROUNDS=${ROUNDS:-6}; CLIENTS=${CLIENTS:-100}
STEPS=" ${STEPS:-tests kernels profile bench bf16 quickstart aggregate} "
SETTINGS=${SETTINGS:-fedimb,flower,loop,vmap,bigbatch}
MODELS=${MODELS:-"cnn resnet32"}; OUT=${OUT:-/tmp/out}; DATA=${DATA:?set DATA}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import flwr" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -f "$DATA" ]; then
  mkdir -p /tmp/data && tar xzf "$DATA" -C /tmp/data || exit 4
  DATA=/tmp/data/$(tar tzf "$DATA" | head -1 | cut -d/ -f1)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
B="python3 benchmarks/bench_round.py --device $DEVICE --dataset cifar10 --data-root $DATA"
B="$B --rounds $ROUNDS --clients $CLIENTS"
if [ "$DEVICE" = cuda ] && [[ $STEPS == *" tests "* ]]; then
  echo "== pytest -m gpu"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -8
fi
if [[ $STEPS == *" kernels "* ]]; then
  echo "== conv kernels"
  timeout 150 python3 benchmarks/conv_kernels.py --device "$DEVICE" --clients "$CLIENTS" \
    --out "$OUT/conv-kernels.json" 2>&1
fi
if [[ $STEPS == *" profile "* ]]; then
  echo "== profile"
  timeout 240 python3 benchmarks/profile_round.py --device "$DEVICE" --model "${MODELS// /,}" \
    --data-root "$DATA" --clients "$CLIENTS" --group-sizes 50,25 --trace \
    --out "$OUT/profile.json" 2>&1
fi
if [[ $STEPS == *" bench "* ]]; then
  for m in $MODELS; do
    echo "== bench $m fp32"
    timeout 320 $B --model "$m" --settings "$SETTINGS" --timeout 200 --out "$OUT/gpu-$m-fp32.json" 2>&1 | grep -v "^running "
  done
fi
if [[ $STEPS == *" bf16 "* ]]; then
  for m in $MODELS; do
    echo "== bench $m bf16, cuDNN autotuning"
    timeout 200 $B --model "$m" --precision bf16 --cudnn-benchmark --settings fedimb,vmap,bigbatch \
      --timeout 120 --out "$OUT/gpu-$m-bf16-autotune.json" 2>&1 | grep -v "^running "
  done
fi
if [[ $STEPS == *" quickstart "* ]]; then
  for m in $MODELS; do
    echo "== bench $m loop, quickstart data"
    timeout 200 $B --model "$m" --stock-data quickstart --settings loop --timeout 180 \
      --out "$OUT/gpu-$m-loop-quickstart.json" 2>&1 | grep -v "^running "
  done
fi
if [[ $STEPS == *" aggregate "* ]]; then
  for m in $MODELS; do
    echo "== FedAvg mean $m"
    timeout 120 python3 benchmarks/bench_aggregate.py --model "$m" --clients "$CLIENTS" \
      --threads "1,$(nproc)" --out "$OUT/aggregate-$m.json" 2>&1
  done
fi
