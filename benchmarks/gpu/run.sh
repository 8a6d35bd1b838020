#!/usr/bin/env bash
# The GPU benchmarks on a machine that has a CUDA build of JAX (Python 3.12, NumPy 2) but
# no TensorFlow, no Keras, no pandas, no scikit-learn and no network. Keras and the two
# packages it needs that such an image lacks (namex, optree) travel as wheels; absl-py,
# h5py, ml-dtypes, numpy, packaging, rich and typing-extensions are expected there.
#
#   bash benchmarks/gpu/run.sh [gpu_scale.py flags]     # under 9.5 minutes
#
# Two steps, each with its own time budget (the script's `--budget`, within which it
# starts no case it cannot finish; `timeout` is only the backstop):
#
#   1. pre-training, benchmarks/gpu_scale.py: 270 s (300 s `timeout`);
#   2. fine-tuning, benchmarks/finetune_scale.py: 180 s (210 s `timeout`): epoch
#      times of 1 to 70 stacked runs at p = 0.02, 0.3 and 1, then the quick preset's
#      147 network runs trained end to end, and the paper grid projected.
#
# STEPS=pretrain or STEPS=finetune runs one step alone (default: both);
# FINETUNE_FLAGS replaces the fine-tuning step's flags after --out and --budget.
#
# Results (gpu_scale.json / .md / .log, finetune_scale.json / .md / .log) go to $OUT,
# else to results/gpu (git-ignored). The wheels are read from $WHEELS, else .whl/ at the
# repository root (git-ignored). Fetch them, where pip works, with:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#       -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
#
# (2.8 MB together. keras 3.15.1 is the version the project is tested with; its
# metadata asks for no particular JAX.)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-results/gpu}"
wheels="${WHEELS:-.whl}"
mkdir -p "$out"

if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "no wheels in $wheels/: fetch them with the pip download command in $0" >&2
    exit 2
fi
# Into a folder of their own, never into the image's environment.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

python3 -c 'import sys, jax, keras, numpy
print("python", sys.version.split()[0], "jax", jax.__version__, "keras",
      keras.__version__, "numpy", numpy.__version__, "devices", jax.devices())'
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# Each script keeps to its --budget (it starts no case it cannot finish in it) and
# rewrites its JSON and Markdown after every case; `timeout` is only the backstop for a
# case stuck in a call that cannot be interrupted, and leaves everything measured before
# it. A failed step does not stop the next one; the exit status is the first failure's.
steps="${STEPS:-pretrain,finetune}"
finetune_flags=(${FINETUNE_FLAGS:---fractions 0.02,0.3,1 --parallel 1,4,8,16,35,70
    --max-epochs 4 --grid quick --stop-fractions 0.02,0.3,1})
rc=0
if [[ ",$steps," == *",pretrain,"* ]]; then
    status=0
    timeout -k 10 300 python3 benchmarks/gpu_scale.py --out "$out" --budget 270 "$@" \
        2>&1 | tee "$out/gpu_scale.log" || status=$?
    echo "pre-training step: exit status $status"
    if [[ $rc -eq 0 ]]; then rc=$status; fi
fi
if [[ ",$steps," == *",finetune,"* ]]; then
    status=0
    timeout -k 10 210 python3 benchmarks/finetune_scale.py --out "$out" --budget 180 \
        "${finetune_flags[@]}" 2>&1 | tee "$out/finetune_scale.log" || status=$?
    echo "fine-tuning step: exit status $status"
    if [[ $rc -eq 0 ]]; then rc=$status; fi
fi
echo "exit status $rc; results in $out"
exit "$rc"
