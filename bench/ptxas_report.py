#!/usr/bin/env python3
"""Registers and spills of every Triton kernel our training step launches, compiled for sm_90a (H100, H200)
on a machine without a GPU.

What ptxas reports is a profile that costs no device time (bench/NOTES.md, session 30): a kernel that uses
all 255 registers and spills, or whose wgmma ptxas serialises (its warning C7515), shows it here before any
timing. It found both in a GEMM-epilogue kernel that ran 5x slower than it should.

The launches are tests/kernels/test_compiles_for_hopper.py's: tiny bf16 models of four families trained a
step through Triton's interpreter (with dropout, and in ``offload``), plus the ops such a step does not
launch, each signature recorded and compiled by Triton's NVIDIA backend, then ptxas -v on its PTX. Tiles and
constexprs are the ones these small shapes pick: lora_glu's and dropout's tiles are fixed, but the norms,
RoPE, the CE and the elementwise kernels size their blocks by the shape and compile other variants at 8B.

    python3 bench/ptxas_report.py            (~45 s on two cores: the compiles)
"""
import os
import re
import sys
import tempfile
from pathlib import Path

# the interpreter for the recorded trial step (set before triton is first imported, as the kernel tests do)
os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

import pytest  # noqa: E402  (pytest.MonkeyPatch: the recording's patches, undone after)


def main():
    from tests.kernels import test_compiles_for_hopper as hopper

    with pytest.MonkeyPatch.context() as mp:
        launches = hopper.record_launches(mp)
        hopper.trial()
    with tempfile.TemporaryDirectory() as tmp:
        done = hopper.compile_all(launches, Path(tmp), report=True)
    rows = [line.split("\t")[1:] for line in done.stdout.splitlines() if line.startswith("REPORT\t")]
    print(f"{'kernel':<44} {'warps':>5} {'registers':>9} {'spilled B':>9}  constexprs")
    for module, name, warps, consts, resources in sorted(rows, key=lambda r: (r[0], r[1], r[3])):
        regs = re.search(r"Used (\d+) registers", resources)
        spilled = re.search(r"(\d+) bytes spill stores", resources)
        print(f"{module.split('.')[-1] + '.' + name:<44} {warps:>5} {regs.group(1) if regs else '?':>9} "
              f"{spilled.group(1) if spilled else '?':>9}  {consts}"
              + ("  (C7515: wgmma serialised)" if "C7515" in resources else ""))
    if done.returncode:
        sys.exit(f"compile failures:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")


if __name__ == "__main__":
    main()
