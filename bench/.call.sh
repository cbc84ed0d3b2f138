#!/usr/bin/env bash
# session 11 call 4 (scratch, not committed)
set -u
export BASE_COMMIT=dc11958
TEST_GROUPS="6" bash bench/gpu_tests.sh $OUT/tests.log 200 > $OUT/info.txt 2>&1
bash bench/ab.sh $OUT/ab1B-handover.jsonl 2 "handover|--shape 1B --ckpt off" "base|--method base --shape 1B --ckpt off" >> $OUT/info.txt 2>&1
timeout 120 python3 bench/train_step.py run --method ours --shape 1B --ckpt off --steps 40 2>/dev/null | grep '^RESULT ' | sed 's/^RESULT //' > $OUT/steps40.json
python3 -c "
import json
for f in ('$OUT/ab1B-handover.jsonl', '$OUT/steps40.json'):
    for l in open(f):
        d = json.loads(l); ms = d['step_ms']
        print(d.get('variant'), d.get('round'), [round(x, 1) for x in ms], round(sum(ms) / len(ms), 2), round(d['tokens_per_s']))
" >> $OUT/info.txt
