#!/usr/bin/env bash
# The checks that need a GPU, as one call on a lent device machine (its image has jax, flax, optax, orbax and
# torch; .whl/ carries what it lacks: tensorflow-datasets, array-record, ml-collections, mnist1d, keras, ...):
#
#   bash benchmarks/gpu_checks.sh [sweep] [grokking] [peers]      # default: sweep grokking
#
# sweep:    benchmarks/sweep_speed.py, runs 1/8/32/128 (issue 5's GPU speed table);
# grokking: `jaxepochs reproduce grokking --seeds 3` (the full 15k-epoch setting and the reduced one);
# peers:    benchmarks/peers.py (jaxepochs, bare lax.scan, Keras 3 on JAX, PyTorch on the same GPU).
# Results go to $OUT (or /tmp/gpu_checks).
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TFDS_DATA_DIR=/tmp/tfds
nvidia-smi -L 2>/dev/null
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'orbax', o.__version__, jax.devices())" || exit 1
checks=${*:-sweep grokking}
for check in $checks; do
  start=$(date +%s)
  case $check in
    sweep) timeout 170 python3 benchmarks/sweep_speed.py --runs 1,8,32,128 2>&1 | tee "$OUT/sweep_speed.txt" ;;
    grokking)
      timeout 280 python3 -m jaxepochs.cli reproduce grokking --seeds 3 --workdir /tmp/grok 2>&1 | tail -40
      cp /tmp/grok/report.md "$OUT/grokking_report.md"; cp /tmp/grok/curves.png "$OUT/grokking_curves.png"
      tar czf "$OUT/grokking_histories.tgz" -C /tmp/grok histories ;;
    peers) timeout 300 python3 benchmarks/peers.py --out "$OUT" 2>&1 | tail -60 ;;
    *) echo "unknown check $check" ;;
  esac
  echo "== $check: $(($(date +%s) - start)) s"
done
