"""The daemon's log: one line per record on stdout, each with its journald priority prefix."""

from __future__ import annotations

import logging
import sys

from .names import show

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournaldFormatter(logging.Formatter):
    """``<6>message``: journald reads the priority from the prefix of every stdout line.

    Every argument (file names above all) is shown on one line (`names.show`), so a name with a
    newline or bytes that are not UTF-8 cannot split a record or forge one; only the message's own
    line breaks start new lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        if record.args:
            record = logging.makeLogRecord(record.__dict__)
            if isinstance(record.args, dict):
                record.args = {k: _shown(v) for k, v in record.args.items()}
            else:
                record.args = tuple(_shown(v) for v in record.args)
        text = record.getMessage()
        if record.name != "nst-daemon":
            text = f"{record.name.rsplit('.', 1)[-1]}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def _shown(value):
    return value if isinstance(value, (int, float)) else show(value)


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JournaldFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
