"""Our kernel package must never shadow Hugging Face's kernel-hub package (import name ``kernels``),
which transformers imports whenever its distribution is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tuneforge_kernels

REPO = Path(__file__).resolve().parents[2]


def test_our_package_lives_in_the_kernels_folder():
    assert Path(tuneforge_kernels.__file__).resolve().parent == REPO / "kernels" / "tuneforge_kernels"


def test_the_kernels_folder_is_not_a_package():
    # a kernels/__init__.py would make `import kernels` from the repository root find this folder
    # ahead of the hub package in site-packages
    assert not (REPO / "kernels" / "__init__.py").exists()


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    # `python -m ...` at the repository root (make demo, the device scripts) puts the root first on sys.path
    env = {**os.environ, "PYTHONPATH": str(REPO / "kernels")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_transformers_imports_from_the_repository_root():
    # what broke CI when transformers 5.25 began to require the hub package: modeling_utils imports
    # transformers.integrations.hub_kernels, which does `from kernels import ...` if it is installed
    proc = _run_at_root("import transformers.modeling_utils, peft; import kernels; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stdout.strip().startswith(str(REPO / "kernels")), proc.stdout


def test_importing_our_kernels_imports_only_torch():
    proc = _run_at_root("import sys; import tuneforge_kernels; bad = [m for m in ('triton', 'transformers', "
                        "'peft') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
