#!/usr/bin/env bash
# The issue's two extra rows: the variable-length batch (bench/train_step.py --data: ours packed as the
# worker's SFT packs and with a changing row count, Unsloth packed and padded, Liger and HF+PEFT padded)
# and the longest single 8B sequence each system trains (mode longest, one cold step per length: fitting
# is what it measures). The first takes ~330 s and the second up to ~520 s (each longest run has a time
# cap), so they go in two device calls of at most 600 s: LADDER "off" skips the ladder, PACKED_CONFIGS
# "off" the variable-length suite.
#   GIT_COMMIT=<sha> bash bench/device_longest.sh [LADDER|off] [PACKED_CONFIGS|off]
# LADDER_RUNS: the ladder's systems as method:ckpt:cap-seconds words (default below), e.g. past 131,072
# tokens: LADDER_RUNS="ours:offload:300 unsloth:unsloth:250" bash bench/device_longest.sh 196608,262144 off
# Writes under $OUT: env.log, r.jsonl + summary.json (packed/padded), longest.jsonl, children.log.
set -u
ladder=${1:-32768,65536,131072}
packed=${2:-ours:1B:off:none::packed-rows,ours:1B:off:none::packed,unsloth:1B:off:none::packed,unsloth:1B:off:none::padded,liger:1B:off:none::padded,hf:1B:off:none::padded}
export PYTHONPATH=$PWD/.peer-site:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
t0=$(date +%s)
: > "$OUT/env.log"
if [[ $packed != off ]]; then
  python3 bench/train_step.py save --shape 1B --path /tmp/rand-1B >> "$OUT/env.log" 2>&1  # Unsloth loads a saved model
  python3 bench/train_step.py matmul >> "$OUT/env.log" 2>&1
  python3 bench/train_step.py suite --configs "$packed" --out "$OUT/r.jsonl" --summary "$OUT/summary.json" \
    --log-dir "$OUT" --deadline-s 360 | tail -9
fi
if [[ $ladder != off ]]; then
  runs=${LADDER_RUNS:-ours:on:120 liger:on:130 unsloth:unsloth:170 hf:on:100}
  if [[ " $runs" == *" unsloth:"* ]]; then  # Unsloth loads a saved model; the others build theirs
    python3 bench/train_step.py save --shape 8B --path /tmp/rand-8B >> "$OUT/env.log" 2>&1
  fi
  for m in $runs; do
    IFS=: read -r method ckpt cap <<< "$m"
    extra=()
    [[ $method == unsloth ]] && extra=(--model-path /tmp/rand-8B)
    log="$OUT/longest-$method-$ckpt.log"
    timeout "$cap" python3 bench/train_step.py longest --shape 8B --method "$method" --ckpt "$ckpt" \
      --ladder "$ladder" --ladder-warmup 0 "${extra[@]}" > "$log" 2>&1
    echo "rc=$? $method" >> "$log"
    grep -h "^LADDER\|^rc=" "$log" | sed "s/^/$method $ckpt /"
    sed -n "s/^RESULT //p" "$log" >> "$OUT/longest.jsonl"
  done
fi
echo "done at $(( $(date +%s) - t0 )) s"
