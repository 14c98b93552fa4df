"""sd_notify: the systemd notification protocol, implemented with the standard library.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; each notification is one datagram of ``KEY=VALUE`` lines. Without
``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import threading
import time


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value[0] == "@":
        return b"\0" + value[1:].encode()  # abstract namespace
    if value[0] == "/":
        return value
    return None  # vsock addresses (vsock:CID:PORT) are not used by a local service


class Notifier:
    """Sends notifications to the service manager; thread-safe; silent when not under systemd."""

    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._sock = None
        self._lock = threading.Lock()
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        valid = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # The interval at which systemd expects WATCHDOG=1, or None when no watchdog is armed.
        self.watchdog_interval = int(usec) / 1e6 if valid else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields) -> bool:
        """Send one notification (``ready=1`` → ``READY=1``); True if a datagram went out."""
        if self._sock is None or not fields:
            return False
        text = "\n".join(f"{k.upper()}={_one_line(v)}" for k, v in fields.items()) + "\n"
        with self._lock:
            try:
                self._sock.sendto(text.encode(), self.address)
                return True
            except OSError:
                return False  # the manager went away; the daemon keeps working

    def ready(self, status: str | None = None) -> bool:
        return self.send(ready=1, **({"status": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(status=text)

    def reloading(self) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp that systemd 253+ requires (Type=notify-reload)."""
        return self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        return self.send(stopping=1, **({"status": status} if status else {}))

    def watchdog(self) -> bool:
        return self.send(watchdog=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value) -> str:
    return str(value).replace("\n", " ")
