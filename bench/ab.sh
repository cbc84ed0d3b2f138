#!/usr/bin/env bash
# Interleaved A/B (A B C A B C ...) of bench/train_step.py runs of our method, one process each, so that a
# drift of the machine during the call spreads over every variant; prints each run's median step and
# appends its RESULT record, tagged with the variant's name, to OUT_JSONL.
#   bash bench/ab.sh OUT_JSONL ROUNDS "name|train_step args" "name|args" ...
# e.g. bash bench/ab.sh $OUT/ab.jsonl 3 "v14|--shape 1B --ckpt off" "nojoin|--shape 1B --ckpt off --join off"
# Leading NAME=VALUE words of a variant's args are its environment ("noexp|PYTORCH_CUDA_ALLOC_CONF=
# expandable_segments:False --shape 8B"); "--method base" (the last --method wins) times .bench-base's code.
# CLOCKS=FILE: nvidia-smi samples the SM clock, power and throttle reasons every 50 ms into FILE meanwhile, and
# bench/power_trace.py FILE OUT_JSONL lines each timed step up with them (is a slow step a clock dip?).
set -u
out=${1:?usage: ab.sh OUT_JSONL ROUNDS "name|args"...}
rounds=${2:?rounds}
shift 2
if [[ -n ${CLOCKS:-} ]]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader -lms 50 > "$CLOCKS" &
  smi=$!
  trap 'kill $smi' EXIT
fi
for ((r = 1; r <= rounds; r++)); do
  for variant in "$@"; do
    name=${variant%%|*}
    # shellcheck disable=SC2206  # the args are words
    args=(${variant#*|})
    envs=()
    while ((${#args[@]})) && [[ ${args[0]} == [A-Za-z_]*=* ]]; do
      envs+=("${args[0]}")
      args=("${args[@]:1}")
    done
    line=$(timeout 300 env "${envs[@]}" python3 bench/train_step.py run --method ours "${args[@]}" 2>>"$out.err" |
      grep '^RESULT ')
    if [[ -z $line ]]; then
      echo "$name round $r: no result (see $out.err)"
      continue
    fi
    echo "${line#RESULT }" | python3 -c "
import json, sys
d = json.load(sys.stdin); d['variant'] = '$name'; d['round'] = $r
open('$out', 'a').write(json.dumps(d) + '\n')
ms = sorted(d.get('step_ms') or [0])
print(f\"{d['variant']:<10} round $r: median {ms[len(ms) // 2]:.1f} ms, {d.get('tokens_per_s') or 0:.0f} tok/s, \"
      f\"peak {d.get('peak_gb') or 0:.2f} GB {d.get('error') or ''}\")"
  done
done
