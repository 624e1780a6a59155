#!/usr/bin/env bash
# The prepared GPU check, for a GPU machine with PyTorch installed and no network (about 5 minutes on an H100).
#
#   bash benchmarks/gpu_check.sh fetch     # here, with network: the wheels that machine lacks, into .whl/
#   bash benchmarks/gpu_check.sh           # there: install .whl/*, run the suite's CUDA tests and the
#                                          # benchmark; the table goes to ${OUT:-.}/gpu_check.md
#
# The device tool carries .whl (name it in `carry`; `echo /.whl/ >> .git/info/exclude` first). FAISS goes as
# the CPU wheel (faiss-gpu's is too large to carry): search then takes the path the project takes when FAISS
# sees no GPU, which is what a CPU-only FAISS on a GPU machine gives users too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 faiss-cpu==1.15.1"

if [ "${1:-}" = fetch ]; then
    mkdir -p .whl
    for wheel in $WHEELS; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$wheel"
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-.}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export CLIPKIT_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
# the suite's CUDA tests (skipped on CPU machines) and the CPU-side decisions of the CUDA paths
# (a failing test is reported and the benchmark still runs: one lease may be all there is; one process, not
# the two workers of pyproject's addopts: a GPU image need not have pytest-xdist)
timeout 240 $PY -m pytest -q -o addopts=-ra -p no:cacheprovider tests/test_cuda_paths.py tests/test_encode.py tests/test_losses.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || echo "gpu_check: the CUDA tests did not all pass (gpu_tests.log)"
timeout 300 $PY benchmarks/gpu_check.py --device cuda --out "$OUT/gpu_check.md"
