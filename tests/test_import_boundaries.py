"""The deployables' import rules (pyproject.toml [tool.importlinter]) hold, checked on the real code,
and the control plane really imports without the ML stack."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_control_plane_imports_without_torch():
    code = (
        "import sys, importlib\n"
        "for m in ['api.main', 'serving.app', 'scheduler.cli', 'scheduler.agent', 'scheduler.loop', 'gpu_worker.contract', 'gpu_worker.validation']:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'trl', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
