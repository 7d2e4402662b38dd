#!/usr/bin/env bash
# What a session with one GPU (H100/H200) runs, in order of value (`fast` first: device time is short); about 25
# minutes in all. Run it from the
# repository root, one step per call where a call is limited to 10 minutes: `bash bench/gpu_session.sh tests`.
#
# The oracle is transformers 5.23.0 (pinned in pyproject); a GPU image with another version must get that one
# first, e.g. from a wheel carried along: pip download --no-deps transformers==5.23.0 -d .whl, then there
# pip install --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site.
# The first step that needs it writes the full-width 3-layer checkpoint (3.5 B values, 7 GB) to
# $TMPDIR/omniray-bench; the 8-layer one of the benchmarks is 15 GB.
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step=${1:-all}

run() { [[ $step == all || $step == "$1" ]]; }

if run fast; then    # the fast-decode checks in about 5 minutes: compiled (CUDA graphs) vs eager, and the code predictor frame
    # (target ≤ 2 ms at batch 1) and talker steps at the real widths, compiled and eager
    $PY -m pytest -q -m gpu tests/test_gpu.py -s -k compiled
    $PY -m bench.bench_stages --device cuda --model full --layers 3 --stages talker --talker-tokens 256 \
        --talker-batch 1,16 --compile on
fi
if run tests; then   # full-width bf16 stages vs fp32 and transformers; CUDA vs CPU greedy on the tiny model
    $PY -m pytest -q -m gpu tests/test_gpu.py -s
fi
if run moe; then     # the MoE block at the real widths: ours vs transformers' eager and grouped_mm experts
    $PY -m bench.bench_moe --device cuda
fi
if run stages; then  # encoders, Code2Wav, thinker and talker at the real widths, 8 layers per stack
    $PY -m bench.bench_stages --device cuda --model full --layers 8 --audio-seconds 10,30 --audio-batch 1,8 \
        --image-sizes 448,896 --image-batch 1,8 --codec-seconds 10,60 --prompt-tokens 512,2048 --prompt-batch 1,4 \
        --talker-tokens 256,1024 --talker-batch 1,8
fi
if run generate; then  # end to end, text and text+speech, batch 1 and 8
    $PY -m bench.bench_generate --device cuda --model full --layers 8 --new-tokens 64 --audio-frames 100 --batch 8
fi
if run serve; then   # through the service on one GPU (stages packed by fractional GPUs), 8 requests at once
    $PY -m bench.bench_serve --device cuda --model full --layers 8 --serve-config serve_config.gpu_packed.yaml \
        --new-tokens 64 --audio-frames 100 --concurrency 8
fi
