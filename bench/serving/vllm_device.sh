#!/usr/bin/env bash
# vLLM on the GPU machine, in one call: unpack vLLM and its requirements (the parts made by
# deploy/vllm/fetch_wheels.sh, carried as .vw1/ .vw2/ ... in earlier calls on the same warm machine or in
# this one), install Tuneforge's resolver plugin, run the gateway-in-front-of-real-vLLM GPU tests
# (tests/serving/test_vllm_gpu.py), then the 1-vs-32-adapters throughput benchmark on an 8B shape.
#   GIT_COMMIT=<sha> [VLLM_TESTS=0] bash bench/serving/vllm_device.sh [END_S]
# VLLM_TESTS=0 skips the GPU tests (94 s on 2026-12-03). (The gateway's own benchmark on that machine's
# CPUs is bench/serving/gateway_device.sh.)
# Writes under $OUT: env.log, vllm_gpu_tests.log, vllm_bench.log, serving-vllm-adapters.json.
set -u
end_s=${1:-570}
t0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# FlashInfer is not carried (437 MiB of cubins): vLLM's sampler imports it unless this is off
export VLLM_USE_FLASHINFER_SAMPLER=0
mkdir -p /tmp/site
if [[ ! -d /tmp/site/vllm ]]; then
  cat .vw*/site.part-* | xz -d -T0 | tar -x -C /tmp/site || { echo "unpack failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels
# the plugin's entry point (vllm.general_plugins) must be installed metadata for vLLM to find it
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site-plugin ./deploy/vllm > "$OUT/env.log" 2>&1 \
  || echo "plugin install failed" >> "$OUT/env.log"
export PYTHONPATH=/tmp/site:/tmp/site-plugin:$PWD:$PWD/kernels
{ echo "commit ${GIT_COMMIT:-?}"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "from importlib.metadata import entry_points; print([e.name for e in entry_points(group='vllm.general_plugins')])"
  echo "unpacked at $(( $(date +%s) - t0 )) s"; } >> "$OUT/env.log" 2>&1
if [[ "${VLLM_TESTS:-1}" == 1 ]]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -s -rA tests/serving/test_vllm_gpu.py > "$OUT/vllm_gpu_tests.log" 2>&1
  grep -E "passed|failed|error" "$OUT/vllm_gpu_tests.log" | tail -3
  echo "tests done at $(( $(date +%s) - t0 )) s"
fi
python3 bench/serving/vllm_adapters.py --prepare-only --workdir /tmp/vllm-bench > "$OUT/vllm_bench.log" 2>&1
left=$(( end_s - ($(date +%s) - t0) ))
echo "model written at $(( $(date +%s) - t0 )) s; ${left} s left for the benchmark"
timeout "$left" python3 bench/serving/vllm_adapters.py --workdir /tmp/vllm-bench --out "$OUT/serving-vllm-adapters.json" >> "$OUT/vllm_bench.log" 2>&1
echo "bench rc $? at $(( $(date +%s) - t0 )) s"
tail -5 "$OUT/vllm_bench.log"
