"""Logging setup: one line per event, journald-friendly under systemd."""

import logging
import os
import sys

_SD_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _SystemdFormatter(logging.Formatter):
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
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s agentstatefs[{os.getpid()}] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if debug else logging.WARNING)
