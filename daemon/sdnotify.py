"""sd_notify(3) without libsystemd: readiness, status, stopping and watchdog pings.

systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=value`` datagrams.
Everything here is a no-op when the variable is unset, so the daemon runs the same way
outside systemd. Sending never raises: a notification that cannot be delivered is logged
once at debug level and dropped (the daemon must not die because systemd went away).

The service side of the protocol used by agentstatefs:

- ``READY=1`` once the mount *answers* (a ``statvfs`` through the kernel returned), not
  merely once ``mount(2)`` succeeded: ``systemctl start`` returns at that moment.
- ``STATUS=...`` one human line shown by ``systemctl status`` (agents, commits).
- ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 2``, only after a ``statvfs`` through the mount
  came back, so a wedged request loop stops the pings and systemd restarts the service.
- ``STOPPING=1`` when a signal arrives and when the FUSE loop ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

import trio

log = logging.getLogger("agentstatefs.sdnotify")

_warned = False


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    return value


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) as one datagram.

    Returns True if it was sent, False if there is no socket or sending failed.
    """
    global _warned
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not fields:
        return False
    # A newline inside a value would start a new field: keep each field one line.
    msg = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_address(addr))
            s.sendall(msg)
        return True
    except OSError as exc:
        if not _warned:
            log.warning("cannot notify systemd at %s: %s", addr, exc)
            _warned = True
        return False


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None if the
    service has no watchdog or ``$WATCHDOG_PID`` names another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not enabled():
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1e6


class _Probe:
    """``statvfs(mountpoint)`` in a worker thread; at most one outstanding at a time.

    A request the daemon never answers would block its thread forever, so a probe that
    times out is abandoned (not cancelled) and no new one starts until it returns.
    """

    def __init__(self, mountpoint: str):
        self.mountpoint = mountpoint
        self._busy = threading.Event()

    def _statvfs(self) -> OSError | None:
        try:
            os.statvfs(self.mountpoint)
            return None
        except OSError as exc:
            return exc
        except Exception as exc:  # never let a probe take the daemon down
            return OSError(0, f"statvfs failed: {exc!r}")
        finally:
            self._busy.clear()

    async def __call__(self, timeout: float) -> OSError | None | bool:
        """None: answered; an OSError: failed; False: no answer within ``timeout``."""
        if self._busy.is_set():
            return False
        self._busy.set()
        result: OSError | None | bool = False
        with trio.move_on_after(timeout):
            result = await trio.to_thread.run_sync(self._statvfs, abandon_on_cancel=True)
        return result


async def run(mountpoint: str, status: Callable[[], str]) -> None:
    """Tell systemd when the mount answers, then keep STATUS fresh and ping the watchdog.

    Runs until cancelled; returns at once outside systemd. ``status()`` returns the
    STATUS line; it runs in a worker thread and may raise (the error is logged).
    An unexpected error here is logged and ends the notifier, never the daemon; with a
    watchdog configured, systemd then restarts the service, which is the safe outcome.
    """
    if not enabled():
        return
    try:
        await _run(mountpoint, status)
    except Exception:
        log.exception("systemd notifier failed; no more READY/STATUS/WATCHDOG messages")


async def _run(mountpoint: str, status: Callable[[], str]) -> None:
    probe = _Probe(mountpoint)
    delay = 0.005
    while True:  # wait until the kernel gets answers from our request loop
        res = await probe(5.0)
        if res is None:
            break
        if isinstance(res, OSError):
            log.debug("mount not answering yet: %s", res)
        await trio.sleep(delay)
        delay = min(delay * 2, 0.5)
    last_status = await _status_line(status, f"serving {mountpoint}")
    notify("READY=1", f"STATUS={last_status}")
    log.info("ready: %s", last_status)

    interval = watchdog_interval()
    period = interval if interval is not None else 10.0
    while True:
        await trio.sleep(period)
        res = await probe(period)
        if res is not None:
            log.warning("mount %s did not answer statfs (%s); watchdog ping withheld", mountpoint,
                        res.strerror if isinstance(res, OSError) else f"no answer within {period:.1f}s")
            continue
        line = await _status_line(status, last_status)
        fields = ["WATCHDOG=1"] if interval is not None else []
        if line != last_status:
            fields.append(f"STATUS={line}")
            last_status = line
        notify(*fields)


async def _status_line(status: Callable[[], str], fallback: str) -> str:
    try:
        return await trio.to_thread.run_sync(status)
    except Exception:
        log.exception("building the STATUS line failed")
        return fallback


def store_status(store, mountpoint: str) -> Callable[[], str]:
    """A STATUS builder for ``store`` served at ``mountpoint``: agents and commits."""

    def line() -> str:
        parts = [f"serving {mountpoint}"]
        agents = getattr(getattr(store, "git", None), "agents", None)
        if callable(agents):
            parts.append(f"{len(agents())} agents")
        commits = getattr(store, "commits", None)
        if isinstance(commits, int):
            parts.append(f"{commits} commits since start")
        if getattr(store, "readonly", False):
            parts.append("read-only")
        return ", ".join(parts)

    return line


def stopping(reason: str) -> None:
    notify("STOPPING=1", f"STATUS={reason}")
