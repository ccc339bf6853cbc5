#!/bin/bash
# Every GPU figure issue 6 asks for, in one command: made for the device
# tool's single call per lease (BUILD_NOTES.md "GPU session plan").
#
#   bash experiments/gpu_suite.sh            # JSON lines in $OUT/gpu.jsonl
#
# Uses the machine's own python3 (its JAX with CUDA, its PyTorch) and this
# checkout on PYTHONPATH, so nothing is installed. Each benchmark is one line
# of `experiments.benchmark --json` (see its docstring for the fields);
# a failing one prints its error and the suite goes on. Sizes can be
# overridden for a dry run on CPU, e.g.
#   STEPS=2 FASTNET_BATCHES=8 RESNET_BATCH=8 bash experiments/gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
out_dir=${OUT:-/tmp/jdl_gpu_suite}
mkdir -p "$out_dir"
jsonl="$out_dir/gpu.jsonl"
: > "$jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JDL_CACHE_DIR=${JDL_CACHE_DIR:-/tmp/jdl_xla_cache}
steps=${STEPS:-50}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out_dir/env.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
  2>&1 | tee -a "$out_dir/env.txt"

# The cuDNN LSTM against the scan (skipped where there is no GPU).
python3 -m pytest -q -p no:cacheprovider tests/test_rnn.py -k cudnn 2>&1 | tail -3 | tee -a "$out_dir/env.txt"

bench() {  # one benchmark line; arguments go to experiments.benchmark
  echo "== $*" >&2
  python3 -m experiments.benchmark --json --steps="$steps" "$@" >> "$jsonl" \
    || echo "{\"failed\": \"$*\"}" >> "$jsonl"
}

# fastnet: bfloat16 against PyTorch's fair best, over batch sizes (MFU goal 40%).
for batch in ${FASTNET_BATCHES:-256 512 1024 2048}; do
  bench --model=fastnet --precision=bfloat16 --batch_size="$batch" --compare=torch
  bench --model=fastnet --precision=bfloat16 --batch_size="$batch" --steps_per_call=10
done
bench --model=resnet18 --precision=bfloat16 --batch_size="${RESNET_BATCH:-256}" --compare=torch
bench --model=dcgan --precision=bfloat16 --batch_size="${DCGAN_BATCH:-64}" --compare=torch
bench --model=lstm --precision=bfloat16 --batch_size="${LSTM_BATCH:-64}" --compare=torch
# The cuDNN kernel computes in float32 only: both sides in float32.
bench --model=lstm --batch_size="${LSTM_BATCH:-64}" --compare=torch
bench --model=lstm --batch_size="${LSTM_BATCH:-64}" --rnn_implementation=cudnn --compare=torch

python3 - "$jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  if "failed" in r:
    print("FAILED", r["failed"])
    continue
  t = r.get("torch") or {}
  mfu = r.get("mfu")
  print(f"{r['model']:<9}{r['precision']:<9}{r.get('rnn_implementation') or '':<6}"
        f"batch {r['batch_size']:<5} K {r['steps_per_call']:<3}"
        f"jdl {r['step_ms']:8.2f} ms  MFU {'%.1f%%' % (100 * mfu) if mfu else 'n/a':>6}"
        + (f"  torch {t['step_ms']:8.2f} ms  ratio {r['ratio_vs_torch']:.2f}x" if t else ""))
EOF
