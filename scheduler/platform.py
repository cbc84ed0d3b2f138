"""Running the platform's processes together: ``tuneforge up`` and the demo.

Each deployable runs as its own process (exactly as in production, where each is a container), all
in this process group: the API, the serving gateway, the built-in inference engine, and the
scheduler with its in-process queue and worker agent. If one dies, all are stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scheduler.settings import Settings


@dataclass
class Platform:
    settings: Settings
    host: str = "127.0.0.1"
    port: int = 8000
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port + 1}"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.port + 2}"

    def _env(self) -> dict[str, str]:
        s = self.settings
        return dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            TUNEFORGE_DATA_DIR=str(s.data_dir),
            TUNEFORGE_DATABASE_URL=s.database_url,
            TUNEFORGE_STORAGE_URL=s.storage_url,
            TUNEFORGE_BROKER_URL=s.broker_url,
            TUNEFORGE_BASE_MODELS=json.dumps(s.base_models),
            TUNEFORGE_SERVING_URL=self.gateway_url,
            TUNEFORGE_ENGINES=json.dumps({m: [self.engine_url] for m in s.base_models}),
            **({"TUNEFORGE_BOOTSTRAP_API_KEY": s.bootstrap_api_key} if s.bootstrap_api_key else {}),
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", *args], env=self._env(), stdout=out, stderr=subprocess.STDOUT if out else None)

    def start(self, timeout: float = 180.0) -> None:
        from scheduler.migrate import upgrade

        upgrade(self.settings.database_url)
        models = [a for m in self.settings.base_models for a in ("--model", m)]
        self._spawn("engine", ["gpu_worker.engine", "--host", "127.0.0.1", "--port", str(self.port + 2), "--data-dir", str(self.settings.data_dir), *models])
        self._spawn("serving", ["serving", "--host", "127.0.0.1", "--port", str(self.port + 1)])
        self._spawn("api", ["api", "--host", self.host, "--port", str(self.port)])
        self._spawn("scheduler", ["scheduler", "scheduler"])
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, timeout: float) -> None:
        checks = {"engine": f"{self.engine_url}/health", "serving": f"{self.gateway_url}/metrics", "api": f"{self.api_url}/metrics"}
        deadline = time.monotonic() + timeout
        pending = dict(checks)
        while pending:
            self.check_alive()
            for name, url in list(pending.items()):
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {', '.join(pending)}")
            time.sleep(0.3)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} process exited with code {proc.returncode}" + (f"; see {self.log_dir / (name + '.log')}" if self.log_dir else ""))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "Platform":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
