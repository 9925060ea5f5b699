"""A real `gptmini serve` process on 127.0.0.1 for the serving tests, and what they read from it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import free_port

BIN = Path(sys.executable).parent


class Server:
    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path, api_key: str | None = None,
                 wait_ready: bool = True, timeout: float = 60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = log
        environ = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
        if api_key:
            environ["GPTMINI_API_KEY"] = api_key
        self.proc = subprocess.Popen([str(BIN / "gptmini"), "serve", *args, "--port", str(self.port)], env=environ,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.wait("/ready" if wait_ready else "/health", timeout)

    def wait(self, path: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gptmini serve exited {self.proc.returncode}:\n{self.log.read_text()}"
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.url}{path} not 200 after {timeout} s:\n{self.log.read_text()[-3000:]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else 0.0

    def wait_for(self, condition, timeout: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
