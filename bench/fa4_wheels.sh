#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4, CuTe DSL: Hopper kernels in Python, JIT-compiled on the GPU) for the
# device, which does not have it. Since session 34 ours' default (`attention="auto"`) computes batched rows
# at head size 64 (the 1B shape) and packed rows with it, so a 1B row or a packed row at the shipped default
# needs it. Its CUDA 13 DSL libraries are one 92 MB wheel, over a call's 64 MiB carry: 237 MB unpacked, of
# which one 193 MB extension module is 50 MB under xz. So the wheels travel in two calls, and the second has
# room for the peers (.peer-site.tar.xz, bench/device_site.sh --xz):
#   bash bench/fa4_wheels.sh         # here (~3 min: xz): .fa4-part1 (~50 MB), .fa4-part2 (~26 MB)
#   call 1, carry [".fa4-part1"]:  mkdir -p .fa4-stash && cp .fa4-part1/* .fa4-stash/
#   call 2, carry [".fa4-part2", ".peer-site.tar.xz"]:  bash bench/fa4_wheels.sh install &&
#     mkdir -p .peer-site && tar -xJf .peer-site.tar.xz -C .peer-site &&
#     export PYTHONPATH=$PWD/.peer-site:/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages:$PWD/kernels:$PWD &&
#     python3 bench/train_step.py suite --configs ours:1B:off,unsloth:1B:off --out $OUT/r.jsonl
# (pydantic comes along for the GPU test, which imports the worker's contract; the second PYTHONPATH entry is
# what nvidia-cutlass-dsl's .pth file adds in a site directory, which a --target folder is not: without it,
# "No module named 'cutlass'", session 21)
# (.fa4-stash is git-ignored, so the warm machine keeps it between the calls: the second call must come
# within the machine's idle release, 30 s.) Python 3.12, CUDA 13.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
big=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
ir=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
if [[ ${1:-} == install ]]; then  # on the device, in call 2
  site=/tmp/site-fa4
  # the small wheels first: pip's --target --upgrade replaces whole top-level folders, and the big wheel's
  # files go into one of them (nvidia_cutlass_dsl/) afterwards
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .fa4-part2/*.whl
  tar -xJf .fa4-part2/big-rest.tar.xz -C "$site"
  xz -dc .fa4-stash/ir.so.xz > "$site/$ir"
  chmod +x "$site/$ir"
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
mkdir -p .fa4-part1 .fa4-part2 "$w/big"
python3 -m zipfile -e "$w/$big" "$w/big"
find "$w/big" -name '*.so' -exec chmod 755 {} +  # zipfile drops the modes pip would have kept
rm "$w/$big"
xz -9 -T0 -c "$w/big/$ir" > .fa4-part1/ir.so.xz
rm "$w/big/$ir"
tar -C "$w/big" -cf - . | xz -9 -T0 > .fa4-part2/big-rest.tar.xz  # its dist-info, the runtime library
mv "$w"/*.whl .fa4-part2/
echo ".fa4-part1: $(du -sh .fa4-part1 | cut -f1)  .fa4-part2: $(du -sh .fa4-part2 | cut -f1)"
