#!/usr/bin/env python3
"""Each timed step of bench/train_step.py runs next to the GPU's clocks and power over that step.

The samples come from nvidia-smi, started on the device before the runs and stopped after them:

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
      --format=csv,noheader -lms 100 > $OUT/clocks.csv &

and the runs' RESULT records (bench/ab.sh's JSONL, or train_step.py's) carry ``timed_start_unix`` and
``step_ms``. Throttle reason 0x4 is the software power cap (``nvmlClocksEventReasonSwPowerCap``).
nvidia-smi's timestamps are the device's local time, UTC there.

    python3 bench/power_trace.py bench/results/2026-12-04-h200-v20-power-clocks.csv \
      bench/results/2026-12-04-h200-v20-power.jsonl
"""
import argparse
import csv
import datetime
import json


def samples(path):
    """(unix time, SM MHz, watts, temperature, throttle reasons) per nvidia-smi line."""
    out = []
    with open(path) as f:
        for row in csv.reader(f):
            if len(row) < 6:
                continue
            try:
                when = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f")
                sm, watts = int(row[1].split()[0]), float(row[3].split()[0])
            except ValueError:
                continue  # a header, or a line cut when the sampler was stopped
            out.append((when.replace(tzinfo=datetime.timezone.utc).timestamp(), sm, watts, row[4].strip(),
                        row[5].strip()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clocks")
    ap.add_argument("runs")
    args = ap.parse_args()
    trace = samples(args.clocks)
    with open(args.runs) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    for run in runs:
        t = run.get("timed_start_unix")
        if t is None:
            continue
        print(f"## {run.get('variant') or run.get('method')} {run.get('shape')} ckpt={run.get('ckpt')}")
        for ms in run["step_ms"]:
            inside = [s for s in trace if t <= s[0] < t + ms / 1e3]
            t += ms / 1e3
            if not inside:
                print(f"{ms:8.1f} ms  (no sample)")
                continue
            sm, watts = [s[1] for s in inside], [s[2] for s in inside]
            reasons = ",".join(sorted({s[4] for s in inside}))
            print(f"{ms:8.1f} ms  SM {min(sm)}-{max(sm)} MHz  {min(watts):.0f}-{max(watts):.0f} W  "
                  f"{inside[0][3]} C  throttle {reasons}")


if __name__ == "__main__":
    main()
