#!/usr/bin/env bash
# benchmarks/gpu_bench.py on the device machine (torch 2.11 + CUDA there, no diffusers, no internet).
#
# The machine lacks diffusers: its wheels travel in the git-ignored folder .whl/ (carry it with the
# run, e.g. carry=[".whl"]). Prepare it here, once, from the repository root:
#
#   echo /.whl/ >> .git/info/exclude     # never committed (the .gitignore lists it as well)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 importlib_metadata zipp lazy-importer
#
# diffusers 0.42.1 requires (unzip -p .whl/diffusers-0.42.1-py3-none-any.whl
# diffusers-0.42.1.dist-info/METADATA | grep Requires-Dist): importlib_metadata, filelock,
# huggingface-hub>=1.32,<3, numpy, regex, requests, safetensors>=0.8, Pillow, zipp>=3.20. The machine has
# all but importlib_metadata; importlib_metadata 10.x in turn requires lazy-importer (Python < 3.15),
# hence the four wheels above (pure Python, ~6.4 MB). Installed with --no-deps: the versions of
# huggingface-hub and safetensors there are not checked (an import error would show in the run).
#
# adacorr_compile itself is not installed there: PYTHONPATH=$PWD makes it importable from the
# repository root, and gpu_bench.py registers the "adacorr" backend when its entry point is missing.
#
# Usage (arguments go to gpu_bench.py; the results land in $OUT, else benchmarks/results):
#   benchmarks/gpu_run.sh                          # both models, all methods, ~7 min
#   benchmarks/gpu_run.sh --smoke --device cuda    # tiny models in bf16 on the GPU: a quick check first
#   benchmarks/gpu_run.sh --models flux --methods "eager,inductor,adacorr default"
#   benchmarks/gpu_run.sh --distributed 4          # several GPUs: benchmarks/distributed.py under torchrun,
#                                                  # NCCL, Flux context parallel over 4 ranks (--size gpu)
#   benchmarks/gpu_run.sh --distributed 2 --steps 28 --options '{"reuse_threshold": 0.2}'
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
else
    echo "gpu_run.sh: no .whl/*.whl here: diffusers must already be importable" >&2
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--distributed" ]]; then
    ranks="${2:?gpu_run.sh --distributed needs the number of GPUs (ranks)}"
    shift 2
    PYTHONUNBUFFERED=1 exec python3 -m torch.distributed.run --standalone --nproc-per-node "$ranks" \
        benchmarks/distributed.py --size gpu --out "${OUT:-benchmarks/results}" "$@"
fi
PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_bench.py --out "${OUT:-benchmarks/results}" "$@"
