#!/usr/bin/env bash
# The issue's two extra rows in one device call: the variable-length batch (ours packed, the peers
# padded; bench/train_step.py --data) and the longest single 8B sequence each system trains (mode
# longest, one cold step per length: fitting is what it measures). Each longest run has a time cap so
# the call ends inside its lease.
#   GIT_COMMIT=<sha> bash bench/device_longest.sh [LADDER] [PACKED_CONFIGS]
# Writes under $OUT: env.log, r.jsonl + summary.json (packed/padded), longest.jsonl, children.log.
set -u
ladder=${1:-32768,65536,131072}
packed=${2:-ours:1B:off:none::packed,hf:1B:off:none::padded,liger:1B:off:none::padded}
export PYTHONPATH=$PWD/.peer-site:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 bench/train_step.py save --shape 8B --path /tmp/rand-8B > "$OUT/env.log" 2>&1 &
saver=$!
python3 bench/train_step.py matmul >> "$OUT/env.log" 2>&1
python3 bench/train_step.py suite --configs "$packed" --out "$OUT/r.jsonl" --summary "$OUT/summary.json" \
  --log-dir "$OUT" --deadline-s 120 | tail -6
wait "$saver"
for m in ours:on:120 liger:on:130 unsloth:unsloth:170 hf:on:100; do
  IFS=: read -r method ckpt cap <<< "$m"
  extra=()
  [[ $method == unsloth ]] && extra=(--model-path /tmp/rand-8B)
  timeout "$cap" python3 bench/train_step.py longest --shape 8B --method "$method" --ckpt "$ckpt" \
    --ladder "$ladder" --ladder-warmup 0 "${extra[@]}" > "$OUT/longest-$method.log" 2>&1
  echo "rc=$? $method" >> "$OUT/longest-$method.log"
  grep -h "^LADDER\|^rc=" "$OUT/longest-$method.log" | sed "s/^/$method /"
  sed -n "s/^RESULT //p" "$OUT/longest-$method.log" >> "$OUT/longest.jsonl"
done
echo "done at $(( $(date +%s) - t0 )) s"
