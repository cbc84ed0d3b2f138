#!/usr/bin/env bash
# Bring vLLM 0.25.0 to the GPU machine, which has no network, in as few 64 MiB transfers as possible.
#
# Here (any x86-64 Linux with pip and network): downloads vllm and the requirements the device image
# lacks (cp312, manylinux x86_64; the image has torch 2.11.0, transformers, triton, numpy, ...), installs
# them into one site folder for Python 3.12, drops what a dense model on a Hopper GPU never loads, packs
# it with xz and cuts the archive into parts, one folder per device call (.vw1/, .vw2/, ...).
#
#   bash deploy/vllm/fetch_wheels.sh            # -> .vw1/ .vw2/ (git-ignored)
#
# Left out, each optional in vLLM 0.25.0 for a dense model on Hopper (read in its source: imported under
# try/except or only by other model families and features): the FlashAttention-2 kernels (Hopper runs
# FA3), the MoE kernels (_moe_C), the Rust frontend binary (vllm-rs), the vendored DeepGEMM / SM100 FMHA
# sources, FlashInfer and its cubins (437 MiB; sampling falls back to PyTorch), TileLang, the video
# codecs, the CUTLASS DSL, quack/tokenspeed/humming kernels, nvcc, z3. That takes the 1155 MiB of wheels
# (21 transfers) to an 86 MiB archive plus Tuneforge's own missing requirements (2 transfers).
# There, bench/serving/vllm_device.sh unpacks the parts into /tmp/site and runs vLLM with
# VLLM_USE_FLASHINFER_SAMPLER=0 (its sampler imports FlashInfer unguarded otherwise).
set -euo pipefail
WORK=${WORK:-/tmp/tuneforge-vllm}
PART=${PART:-55m}
PLATFORMS=()
for n in 2_17 2_24 2_26 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--python-version 3.12 --implementation cp "${PLATFORMS[@]}" --only-binary=:all:)
mkdir -p "$WORK/whole"
python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$WORK/whole" vllm==0.25.0 \
  cachetools blake3 "fastapi<0.137,>=0.133" "starlette>=1.0.1" "openai>=2.0.0" "pydantic>=2.12.0" \
  "prometheus-fastapi-instrumentator>=8.0.0" lm-format-enforcer==0.11.3 "llguidance<1.8.0,>=1.7.0" outlines_core==0.2.14 \
  diskcache==5.6.3 lark==1.2.2 "xgrammar<1.0.0,>=0.2.1" partial-json-parser "jsonschema>=4.23.0" "pyzmq>=25.0.0" msgspec \
  "mistral_common>=1.11.5" compressed-tensors==0.17.0 depyf==0.20.0 watchfiles python-json-logger pybase64 cbor2 ijson \
  setproctitle "openai-harmony>=0.0.3" "anthropic>=0.71.0" "model-hosting-container-standards<1.0.0,>=0.1.14" mcp \
  "opentelemetry-sdk>=1.27.0" "opentelemetry-api>=1.27.0" "opentelemetry-exporter-otlp>=1.27.0" \
  "opentelemetry-semantic-conventions-ai>=0.4.1" nvtx==0.2.15 \
  annotated-types astor cffi dill docstring-parser jiter jmespath jsonschema-specifications loguru mcp-types \
  opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http \
  opentelemetry-semantic-conventions pydantic-core pydantic-extra-types pyelftools pyjwt python-multipart referencing \
  rpds-py sniffio sse-starlette supervisor typing-inspection uvicorn interegular \
  httpx2 httpcore2 truststore googleapis-common-protos opentelemetry-exporter-otlp-proto-common opentelemetry-proto pycparser \
  `# xgrammar 0.2.9 needs a newer tvm-ffi than the 0.1.9 vllm pins for FlashInfer (left out): seen on the H200` \
  "apache-tvm-ffi>=0.1.15" \
  `# Tuneforge's own requirements the image lacks (the gateway and the resolver plugin run there too)` \
  pydantic-settings python-dotenv httptools sqlalchemy greenlet alembic mako "psycopg[binary]" psycopg-binary celery kombu \
  billiard vine amqp click-didyoumean click-repl click-plugins redis boto3 botocore s3transfer tenacity authlib structlog \
  prompt-toolkit wcwidth tzdata
rm -rf "$WORK/site"
python3 -m pip install -q --no-deps --no-compile "${TARGET[@]}" --target "$WORK/site" "$WORK"/whole/*.whl
rm -f "$WORK"/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$WORK"/site/vllm/_moe_C_stable_libtorch.abi3.so "$WORK"/site/vllm/vllm-rs
rm -rf "$WORK"/site/vllm/third_party/deep_gemm "$WORK"/site/vllm/third_party/fmha_sm100
tar -C "$WORK/site" -cf - . | xz -9 -T0 > "$WORK/site.tar.xz"
rm -rf .vw[0-9]*
split -b "$PART" -a 2 "$WORK/site.tar.xz" "$WORK/site.part-"
i=1
for part in "$WORK"/site.part-*; do mkdir -p ".vw$i" && mv "$part" ".vw$i/" && i=$((i + 1)); done
ls -la .vw*/
