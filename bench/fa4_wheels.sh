#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4, CuTe DSL: Hopper kernels in Python, JIT-compiled on the GPU) for the
# device, which does not have it: the attention micro's `fa4` cases (bench/micro.py --only attn) time it
# against cuDNN and flash-2 at the 8B and 1B shapes. Its CUDA 13 DSL libraries are one 92 MB wheel, over a
# call's 64 MiB carry, so the wheels travel in two calls (bench/NOTES.md, "Open items"):
#   bash bench/fa4_wheels.sh                       # here: .fa4-part1 (54 MiB), .fa4-part2 (~48 MiB)
#   call 1, carry [".fa4-part1"]:  mkdir -p .fa4-stash && cp .fa4-part1/* .fa4-stash/
#   call 2, carry [".fa4-part2"]:  bash bench/fa4_wheels.sh install &&
#     export PYTHONPATH=/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages &&
#     python3 bench/micro.py --only attn --out $OUT/micro-attn.jsonl &&
#     python3 -m pytest -q --confcutdir=tests/gpu_worker tests/gpu_worker/patching/test_hopper_attention.py &&
#     python3 bench/train_step.py suite --configs ours:8B:off,ours:8B:off:::fixed::::fa4 --out $OUT/ab.jsonl
# (pydantic comes along for the GPU test, which imports the worker's contract; the second PYTHONPATH entry is
# what nvidia-cutlass-dsl's .pth file adds in a site directory, which a --target folder is not: without it,
# "No module named 'cutlass'", session 21)
# (.fa4-stash is git-ignored, so the warm machine keeps it between the calls.) Python 3.12, CUDA 13.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
big=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
if [[ ${1:-} == install ]]; then  # on the device, in call 2
  w=$(mktemp -d)
  cat .fa4-stash/"$big".part-* .fa4-part2/"$big".part-* > "$w/$big"
  cp .fa4-part2/*.whl "$w/"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-fa4 "$w"/*.whl
  rm -rf "$w"
  exit 0
fi
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
# the device has torch, einops, typing-extensions, protobuf and cuda-bindings; these it lacks
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$w" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$w" pydantic  # with its own needs
rm -f "$w"/typing_extensions-*.whl  # the device's own (torch's)
rm -rf .fa4-part1 .fa4-part2
mkdir -p .fa4-part1 .fa4-part2
# uneven halves: each call's carry plus the working tree (~7 MB) stays under 64 MiB
split -b 54M -d "$w/$big" "$w/$big.part-"
mv "$w/$big.part-00" .fa4-part1/
mv "$w/$big.part-01" .fa4-part2/
rm "$w/$big"
mv "$w"/*.whl .fa4-part2/
echo ".fa4-part1: $(du -sh .fa4-part1 | cut -f1)  .fa4-part2: $(du -sh .fa4-part2 | cut -f1)"
