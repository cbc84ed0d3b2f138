#!/usr/bin/env bash
# Bring vLLM 0.25.0 to the GPU machine, which has no network (NOT RUN YET; see
# bench/results/serving-results.md for the sizes measured on 2026-12-03: the vllm wheel is 238.5 MiB,
# the 47 requirements missing from the device image 588 MiB, plus their own unsized requirements).
#
# Here: downloads vllm and the requirements the device image lacks (cp312, manylinux x86_64) into
# DEST, cuts every wheel into parts of at most 60 MiB, and packs the parts into batches of at most 60
# MiB (DEST/batch-NN/), because one device call carries at most 64 MiB. Carry one batch per call
# (`carry: [".whl-vllm/batch-NN"]`) on one warm machine: ignored paths already there are kept between
# calls, a fresh machine is bare. Then, there: `bash deploy/vllm/fetch_wheels.sh --install`.
#
#   echo /.whl-vllm/ >> .git/info/exclude && bash deploy/vllm/fetch_wheels.sh
set -euo pipefail
DEST=${DEST:-.whl-vllm}
PART=60m

if [[ "${1:-}" == "--install" ]]; then  # on the device: reassemble, install into /tmp/site
  mkdir -p /tmp/wheels
  for part in "$DEST"/batch-*/*.part-aa; do
    base=$(basename "${part%.part-aa}")
    cat "$DEST"/batch-*/"$base".part-* > "/tmp/wheels/$base"
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/wheels/*.whl
  # The list above was closed by hand three levels deep; let pip say what is still missing or clashing.
  PYTHONPATH=/tmp/site python3 -m pip check || true
  echo "export PYTHONPATH=/tmp/site"
  exit 0
fi

PLATFORMS=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DEST/whole")
mkdir -p "$DEST/whole"
"${PIP[@]}" vllm==0.25.0
# The vllm wheel's requirements that the device image (KINDS.md's package list) does not hold, and
# their own requirements found the same way, three levels deep (the cu13 extras of
# nvidia-cutlass-dsl and humming-kernels included); torch 2.11.0, torchaudio, torchvision are there.
"${PIP[@]}" cachetools blake3 "fastapi<0.137,>=0.133" "starlette>=1.0.1" "openai>=2.0.0" "pydantic>=2.12.0" \
  "prometheus-fastapi-instrumentator>=8.0.0" lm-format-enforcer==0.11.3 "llguidance<1.8.0,>=1.7.0" outlines_core==0.2.14 \
  diskcache==5.6.3 lark==1.2.2 "xgrammar<1.0.0,>=0.2.1" partial-json-parser "jsonschema>=4.23.0" "pyzmq>=25.0.0" msgspec \
  "mistral_common>=1.11.5" compressed-tensors==0.17.0 depyf==0.20.0 watchfiles python-json-logger pybase64 cbor2 ijson \
  setproctitle "openai-harmony>=0.0.3" "anthropic>=0.71.0" "model-hosting-container-standards<1.0.0,>=0.1.14" mcp \
  "opentelemetry-sdk>=1.27.0" "opentelemetry-api>=1.27.0" "opentelemetry-exporter-otlp>=1.27.0" \
  "opentelemetry-semantic-conventions-ai>=0.4.1" "torchcodec>=0.14" PyNvVideoCodec==2.0.4 flashinfer-python==0.6.13 \
  flashinfer-cubin==0.6.13 apache-tvm-ffi==0.1.9 tilelang==0.1.9 "nvidia-cudnn-frontend>=1.19.1" nvtx==0.2.15 \
  "fastsafetensors>=0.3.2" nvidia-cutlass-dsl==4.5.2 "quack-kernels>=0.3.3" tokenspeed-mla==0.1.2 humming-kernels==0.1.10 \
  annotated-types astor cffi cuda-tile dill docstring-parser jiter jmespath jsonschema-specifications loguru mcp-types \
  opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http \
  opentelemetry-semantic-conventions pydantic-core pydantic-extra-types pyelftools pyjwt python-multipart referencing \
  rpds-py sniffio sse-starlette supervisor tokenspeed-triton torch-c-dlpack-ext typing-inspection uvicorn interegular z3-solver \
  nvidia-cutlass-dsl-libs-base==4.5.2 nvidia-cutlass-dsl-libs-cu13==4.5.2 \
  nvidia-cuda-cccl nvidia-cuda-nvcc httpx2 httpcore2 truststore googleapis-common-protos \
  opentelemetry-exporter-otlp-proto-common opentelemetry-proto pycparser
# Parts, then batches of at most 60 MiB of parts.
mkdir -p "$DEST/parts"
for whl in "$DEST"/whole/*.whl; do split -b "$PART" -a 2 "$whl" "$DEST/parts/$(basename "$whl").part-"; done
batch=0; size=0; limit=$((60 * 1024 * 1024))
for part in $(ls -S "$DEST"/parts/*); do
  bytes=$(stat -c %s "$part")
  if (( size + bytes > limit )); then batch=$((batch + 1)); size=0; fi
  mkdir -p "$(printf '%s/batch-%02d' "$DEST" "$batch")"
  mv "$part" "$(printf '%s/batch-%02d/' "$DEST" "$batch")"
  size=$((size + bytes))
done
rmdir "$DEST/parts"
du -sh "$DEST"/whole; echo "$((batch + 1)) batches of <= 60 MiB under $DEST/batch-*"
