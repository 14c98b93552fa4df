"""Helpers for the daemon tests: rule files, real images, and the daemon as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# Small and quick: random weights (tests never have ImageNet's), a few layers, tiny images.
FAST_PARAMS = {"size": 32, "iterations": 1, "weights": "random",
               "content_layers": ["relu2_1"], "style_layers": ["relu1_1", "relu2_1"]}


def write_image(path, seed: int, size=(40, 30), fmt=None) -> Path:
    """A distinct noise image (every seed gives different bytes, so a different content hash)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGB").save(path, format=fmt)
    return path


def image_bytes(seed: int, size=(40, 30), fmt="PNG") -> bytes:
    import io

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def make_config(folder, rules: list[dict], settings: dict | None = None, defaults: dict | None = None,
                name="config.yaml") -> Path:
    """A rule file in `folder` (paths in it relative to `folder`); a style image styles/style.png."""
    folder = Path(folder)
    style = folder / "styles" / "style.png"
    if not style.exists():
        write_image(style, 10_000, (48, 48))
    data = {
        "settings": {"journal": "state/journal.sqlite", "socket": None, "settle": 0.5, "scan_interval": 30,
                     **(settings or {})},
        "defaults": {**FAST_PARAMS, **(defaults or {})},
        "rules": [{"style": "styles/style.png", **r} for r in rules],
    }
    for r in data["rules"]:
        for key in ("watch",):
            for w in ([r[key]] if isinstance(r[key], str) else r[key]):
                (folder / w).mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Daemon:
    """nst-daemon as a real subprocess; its stdout lines are collected as they come."""

    def __init__(self, config: Path, *args: str, env: dict | None = None, prefix: list[str] | None = None):
        self.config = Path(config)
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **(env or {})}
        for inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            if inherited not in (env or {}):
                self.env.pop(inherited, None)
        self.prefix = prefix or []
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._cond = threading.Condition()

    def start(self, wait_ready: bool = True, timeout: float = 120) -> "Daemon":
        self.proc = subprocess.Popen(
            self.prefix + [sys.executable, "-m", "daemon.main", "--config", str(self.config), *self.args],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="backslashreplace")
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if wait_ready:
            self.wait_log("ready:", timeout)
        return self

    def _read(self, proc) -> None:
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, needle: str, timeout: float = 60, start: int = 0) -> str:
        """The first log line (from line `start` on) containing `needle`."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if needle in line:
                        return line
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(needle in x for x in self.lines[start:])
                                 and self._drained()):
                    raise AssertionError(f"no log line with {needle!r} after {timeout}s; log:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.5))

    def _drained(self) -> bool:
        return self.proc.stdout.closed or self.proc.poll() is not None

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the daemon did not stop on SIGTERM; log:\n" + self.text)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class NotifyListener:
    """A real NOTIFY_SOCKET (abstract namespace, as systemd uses) that records each datagram."""

    def __init__(self):
        self.name = f"@nst-test-notify-{os.getpid()}-{id(self)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict]] = []
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60, after: int = 0) -> dict:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, m in self.messages[after:]:
                    if key in m and (value is None or m[key] == value or value in m[key]):
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no notification {key}={value} in {self.messages}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def journal_rows(db: Path) -> list[dict]:
    import sqlite3

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        con.close()


def wait_until(cond, timeout: float, what: str, interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def files(folder: Path, pattern: str = "*") -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")) if folder.exists() else []


def sidecar(path: Path) -> dict:
    return json.loads(Path(str(path) + ".error.json").read_text())
