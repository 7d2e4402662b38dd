#!/usr/bin/env bash
# What a session lent one GPU (H100/H200) runs, in order of value. A session has 15 minutes of device time, the
# machine's start (a minute or more) included, and one call runs at most 10: `fast` is one call of at most 9
# minutes, which leaves no time to start a second machine, so `full` and `e2e` are for the next lease. Compiling is
# most of it: every engine compiles each batch bucket and attention span it may meet before its first step (about
# 25 graphs for bench_gpu's cases), unmeasured on a GPU so far, so each benchmark prints every case as it finishes
# and the cheapest cases run first. Each check runs under its own time limit and the next runs whatever the last
# did; logs and result files go to $OUT (the device tool's folder that comes back), else to ./gpu-out.
#
#   bash bench/gpu_session.sh fast    # tiny-model CUDA checks, the fast-decode targets
#   bash bench/gpu_session.sh full    # full-width bf16 stages vs fp32 and transformers, each stage's speed
#   bash bench/gpu_session.sh e2e     # OmniModel.generate vs transformers' generate (small config); the MoE block
#
# The device image has torch but no registry, and lacks some of our imports. Carry them as wheels for its Python
# (3.12), fetched here once (the folder .whl, ignored by git, named in the call's `carry`):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.23.0 av soundfile cffi pycparser
# transformers is pinned because the image's (5.17) is not the oracle the tests are written against. The image has
# no pydantic, which pyproject's pytest `filterwarnings` names, so the tests run under a pytest.ini of our own.
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
step=${1:-fast}
failed=0

if [[ -d .whl ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
printf '[pytest]\npythonpath = .\ntimeout = 600\nmarkers =\n    gpu: needs CUDA\n    slow: slow\n' > /tmp/omniray-pytest.ini
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/machine.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/machine.txt"
touch /tmp/omniray-session-start

check() {  # check NAME SECONDS COMMAND...: run it under a limit, its output to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [[ $rc == 0 ]] || failed=1
}

tests() { $PY -m pytest -c /tmp/omniray-pytest.ini --rootdir . -q -s -p no:cacheprovider tests/test_gpu.py "$@"; }

if [[ $step == fast ]]; then
    check tiny 200 tests -k tiny
    check targets 330 $PY -m bench.bench_gpu --layers 3 --cases frame,decode,speech --frame-batch 1,16 --replies 16 \
        --frames 100
elif [[ $step == full ]]; then
    # the full-width checkpoint (3 layers, bf16, 7 GB) is written once, by the first of these
    check full_tests 300 tests -k full_width
    check stages 240 $PY -m bench.bench_stages --device cuda --model full --layers 3 --stages talker,code2wav,thinker \
        --talker-tokens 256 --talker-batch 1,16 --prompt-tokens 512 --prompt-batch 1 --codec-seconds 10 --compile on
elif [[ $step == e2e ]]; then
    check generate 300 $PY -m bench.bench_generate --device cuda --model small --cases audio --batch 8 \
        --new-tokens 32 --audio-frames 100 --compile on
    # the MoE block at the real widths, ours vs transformers' experts (the thinker step's largest part)
    check moe 150 $PY -m bench.bench_moe --device cuda --tokens 1,16,256
else
    echo "unknown step $step: fast, full or e2e" >&2
    exit 2
fi
find bench/results -newer /tmp/omniray-session-start -name '*.json' -exec cp {} "$OUT/" \;
git diff bench/RESULTS.md > "$OUT/RESULTS.diff"
exit $failed
