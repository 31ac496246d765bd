"""Starts a `wafer dev` server for the tests and stops it afterwards."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# clients/python/tests -> the repository root.
REPO = HERE.parent.parent.parent
# Import the package from this checkout, installed or not.
sys.path.insert(0, str(HERE.parent))

STARTUP_TIMEOUT_S = 30.0
LISTENING = re.compile(r"listening on http://(\S+) api (\S+)")


@dataclass
class WaferServer:
    """A running `wafer dev`."""

    process: subprocess.Popen
    # host:port of the HTTP and Cap'n Proto API listeners.
    http: str
    api: str
    admin_token: str
    functions: Path
    data: Path
    output: list[str] = field(default_factory=list)

    def module(self, name: str) -> bytes:
        """The built example function `name` (e.g. `markdown`)."""
        path = self.functions / f"{name}.wasm"
        if not path.is_file():
            pytest.fail(f"{path} is missing: build the example functions first")
        return path.read_bytes()

    def create_token(self, scopes: list[str], name: str = "") -> str:
        """Creates an API token with `scopes` over HTTP; returns its secret."""
        request = urllib.request.Request(
            f"http://{self.http}/v1/tokens",
            data=json.dumps({"scopes": scopes, "name": name}).encode(),
            headers={
                "Authorization": f"Bearer {self.admin_token}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)["token"]


def _binary() -> Path:
    return Path(os.environ.get("WAFER_BIN") or REPO / "target" / "release" / "wafer")


def _functions() -> Path:
    return Path(os.environ.get("WAFER_FUNCTIONS") or REPO / "target" / "functions")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def wafer(tmp_path_factory: pytest.TempPathFactory):
    """One `wafer dev` server (admin token, no examples) for the whole session."""
    binary = _binary()
    if not binary.is_file():
        pytest.fail(f"no wafer binary at {binary}: build it (cargo build --release) or set WAFER_BIN")
    root = tmp_path_factory.mktemp("wafer")
    data = root / "data"
    token = "py-" + secrets.token_hex(16)
    env = dict(os.environ, WAFER_ADMIN_TOKEN=token, RUST_LOG="warn")
    stderr = open(root / "stderr.log", "wb")
    process = subprocess.Popen(
        [str(binary), "dev", "--http", "127.0.0.1:0", "--api", "127.0.0.1:0",
         "--no-examples", "--data", str(data)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=root,
        text=True,
    )
    output: list[str] = []
    lines: "queue.Queue[str | None]" = queue.Queue()

    def drain() -> None:
        # Keep reading for the server's whole life: a closed pipe would kill it.
        for line in process.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, name="wafer-stdout", daemon=True).start()
    try:
        try:
            first = lines.get(timeout=STARTUP_TIMEOUT_S)
        except queue.Empty:
            first = None
        match = LISTENING.search(first or "")
        if not match:
            _stop(process)
            stderr.flush()
            pytest.fail(
                f"wafer dev did not start (first line {first!r}, exit {process.poll()}):\n"
                + (root / "stderr.log").read_text(errors="replace")[-4000:]
            )
        yield WaferServer(
            process=process,
            http=match.group(1),
            api=match.group(2),
            admin_token=token,
            functions=_functions(),
            data=data,
            output=output,
        )
    finally:
        _stop(process)
        stderr.close()
