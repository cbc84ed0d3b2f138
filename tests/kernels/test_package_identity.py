"""Our ``kernels`` package must never be mistaken for Hugging Face's kernel-hub package of that name."""

from __future__ import annotations

from pathlib import Path

import kernels

REPO = Path(__file__).resolve().parents[2]


def test_kernels_is_our_package():
    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"


def test_no_hub_api_and_no_version():
    for name in ("get_kernel", "LayerRepository", "use_kernel_forward_from_hub", "kernelize", "__version__"):
        assert not hasattr(kernels, name), name


def test_transformers_probe_says_unavailable():
    import pytest

    import_utils = pytest.importorskip("transformers.utils.import_utils")
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False


def test_importing_kernels_imports_only_torch():
    import subprocess
    import sys

    code = ("import sys; import kernels; bad = [m for m in ('triton', 'transformers', 'peft') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
