#!/usr/bin/env bash
# benchmarks/gpu_scale.py on a GPU machine that has a CUDA build of JAX (Python 3.12,
# NumPy 2) but no TensorFlow, no Keras and no network. Keras and the two packages it
# needs that such an image lacks (namex, optree) travel as wheels; absl-py, h5py,
# ml-dtypes, numpy, packaging, rich and typing-extensions are expected there.
#
#   bash benchmarks/gpu/run.sh [gpu_scale.py flags]     # about 8 minutes
#
# Results (gpu_scale.json, gpu_scale.md, gpu_scale.log) go to $OUT, else to
# results/gpu (git-ignored). The wheels are read from $WHEELS, else .whl/ at the repository
# root (git-ignored). Fetch them, where pip works, with:
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

# The script keeps to --budget (it starts no case in the budget's last 15 s and stops
# a running one at its end) and rewrites its JSON and Markdown after every case;
# `timeout` is only the backstop for a case stuck in a call that cannot be
# interrupted, and leaves everything measured before it.
rc=0
timeout -k 10 500 python3 benchmarks/gpu_scale.py --out "$out" --budget 440 "$@" \
    2>&1 | tee "$out/gpu_scale.log" || rc=$?
echo "exit status $rc; results in $out"
exit "$rc"
