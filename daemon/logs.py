"""Logging setup: one line per event, journald-friendly under systemd."""

import logging
import os
import sys

from ..fs.changes import safe_text

_SD_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _one_line(text: str) -> str:
    """A log record is one line: control characters in its message (a caller's file
    name or command name) are escaped, so nobody can forge a line. Tracebacks, which
    we write ourselves, keep their newlines."""
    return safe_text(text, limit=1 << 16)


class _Formatter(logging.Formatter):
    def formatMessage(self, record):
        record.message = _one_line(record.message)
        return super().formatMessage(record)


class _SystemdFormatter(_Formatter):
    """Prefix ``<N>`` (sd-daemon priority) so journald records the level; no timestamp."""

    def format(self, record):
        return f"<{_SD_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup(debug: bool = False, systemd: bool = False, stream=None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    if systemd:
        handler.setFormatter(_SystemdFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_Formatter(
            f"%(asctime)s agentstatefs[{os.getpid()}] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if debug else logging.WARNING)
