#!/usr/bin/env bash
# One device call, in the order that fits a lease: the GPU tests of kernels/ and gpu_worker/patching/
# run while the random models Unsloth loads from a path are saved; then the bf16 matmul ceiling; then the
# training-step suite, which skips what no longer fits before END_S seconds after the start.
#
# Device, from the repo root, carrying .peer-site (bench/device_site.sh) and, for the
# "base" method, .bench-base (git archive <old commit> kernels gpu_worker/__init__.py gpu_worker/patching):
#   GIT_COMMIT=<sha> BASE_COMMIT=<sha> [MICRO=1|ce,...] bash bench/device_run.sh ours:8B:off,unsloth:8B:off 560
# (the device's .git may be stale: pass GIT_COMMIT from here). INT64_S: seconds kept for the int64 tests
# at the end (default 90). Writes under $OUT: env.log (GPU, versions, saves, matmul), gpu_tests.log,
# r.jsonl, children.log, summary.json (the file kept under bench/results/), micro.jsonl with MICRO and
# focus.log with FOCUS.
set -u
configs=${1:?usage: device_run.sh CONFIGS [END_S]}
end_s=${2:-560}
t0=$(date +%s)
export PYTHONPATH=$PWD/.peer-site:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"; } \
  > "$OUT/env.log" 2>&1
savers=()
for shape in 8B 1B; do  # concurrently: each is mostly host-side serialisation
  if [[ ",$configs" == *",unsloth:$shape:"* ]]; then
    python3 bench/train_step.py save --shape "$shape" --path "/tmp/rand-$shape" >> "$OUT/env.log" 2>&1 &
    savers+=($!)
  fi
done
# the kernel tests took 143 s on 2026-12-03 (26 s on 2026-11-22) with the new >2^31-element cases and the
# concurrent saves: those cases run last, if time is left
# GPU_TESTS=0: none (a call that only measures a tree whose GPU tests already ran in this session);
# TEST_GROUPS="6 7": only those of bench/gpu_tests.sh's groups; GPU_TESTS_S: their time limit (default 240)
# FOCUS="tests/...py::test_name": that one test alone, next to the groups, its whole output in focus.log
# (a failure's text is not lost to a group's time limit: session 18)
focus_pid=
if [[ -n "${FOCUS:-}" ]]; then
  timeout "${GPU_TESTS_S:-240}" python3 -m pytest -x -q -m gpu -p no:cacheprovider --tb=long \
    --confcutdir="$(dirname "${FOCUS%%::*}")" "$FOCUS" > "$OUT/focus.log" 2>&1 &
  focus_pid=$!
fi
: > "$OUT/gpu_tests.log"
if [[ ${GPU_TESTS:-1} != 0 ]]; then  # in parallel groups: ~3 min on a fresh machine (session 9)
  bash bench/gpu_tests.sh "$OUT/gpu_tests.log" "${GPU_TESTS_S:-240}"
fi
grep -E "passed|failed|error" "$OUT/gpu_tests.log"
for p in "${savers[@]}" $focus_pid; do wait "$p"; done
[[ -n $focus_pid ]] && echo "focus: $(tail -1 "$OUT/focus.log")"
echo "tests and saves done at $(( $(date +%s) - t0 )) s"
python3 bench/train_step.py matmul >> "$OUT/env.log" 2>&1
if [[ -n "${MICRO:-}" ]]; then  # MICRO=1: every group; else a list of groups (micro.py --only), e.g. ce
  groups=$([[ $MICRO == 1 ]] && echo copy,gemm,ce,elementwise,proj,tuned,glu,attn,varlen_pad,aug || echo "$MICRO")
  python3 bench/micro.py --only "$groups" --out "$OUT/micro.jsonl" 2>&1 | tail -20
fi
left=$(( end_s - ${INT64_S:-90} - ($(date +%s) - t0) ))
python3 bench/train_step.py suite --configs "$configs" --model-root /tmp --out "$OUT/r.jsonl" \
  --summary "$OUT/summary.json" --log-dir "$OUT" --deadline-s "$left"
left=$(( end_s - ($(date +%s) - t0) ))
if (( left > 30 )) && (( ${INT64_S:-90} > 0 )) && [[ ${GPU_TESTS:-1} != 0 ]]; then
  timeout "$left" python3 -m pytest -q -m gpu -p no:cacheprovider --confcutdir=tests/kernels tests/kernels \
    -k int64 >> "$OUT/gpu_tests.log" 2>&1
fi
grep -E "passed|failed|error" "$OUT/gpu_tests.log"
echo "done at $(( $(date +%s) - t0 )) s"
