"""A small helper for agents written in Python: ``agentstatefs.client``.

It uses nothing but the files of the mount (the files are the API; any language can do
the same with open/read/write/close, xattrs and rename):

    from agentstatefs import client
    doc, version = client.read("planner", "config.json")
    client.write("planner", "memory.json", {"facts": []})          # Refused if invalid
    client.cas_write("planner", "config.json", doc, version)        # Conflict if it moved on
    client.update("planner", "config.json", lambda d: {**d, "n": d.get("n", 0) + 1})
    client.patch("planner", "config.json", {"temp": 0.7})           # RFC 7396 merge patch
    client.patch("planner", "memory.json", [{"op": "add", "path": "/facts/-", "value": "x"}])
    for event in client.watch("planner"): ...

Every write reports a refusal as ``Refused`` (with the daemon's reason), unlike
``json.dump(d, open(p, "w"))``, whose close error nobody sees. The mount is the
``mountpoint`` argument, else ``$AGENTSTATEFS_MOUNTPOINT``, else ``/mnt/agents``.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from typing import Any, Callable, Iterator

DEFAULT_MOUNTPOINT = "/mnt/agents"
VERSION = "user.agentstatefs.version"
IF_VERSION = "user.agentstatefs.if-version"
LAST_ERROR = "user.agentstatefs.last-error"

__all__ = ["Client", "AgentStateError", "Refused", "Conflict", "read", "write", "cas_write", "update",
           "patch", "watch", "last_error"]


class AgentStateError(OSError):
    """A write through the mount failed; ``errno`` and ``reason`` say why."""

    def __init__(self, err: int, reason: str, path: str = ""):
        super().__init__(err, reason, path or None)
        self.reason = reason


class Refused(AgentStateError):
    """The content was refused (invalid JSON, too large, a patch that does not apply);
    it is kept in ``@rejected`` and the previous version stays."""


class Conflict(AgentStateError):
    """Compare-and-swap lost: the file is no longer at the expected version (ESTALE),
    or a JSON Patch ``test`` operation failed."""


def _dumps(doc: Any) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as exc:        # NaN/Infinity: not JSON (RFC 8259); refuse before writing
        raise Refused(errno.EINVAL, f"not valid JSON: {exc}") from None


class Client:
    def __init__(self, mountpoint: str | None = None):
        self.mountpoint = os.path.abspath(mountpoint or os.environ.get("AGENTSTATEFS_MOUNTPOINT")
                                          or DEFAULT_MOUNTPOINT)

    # -- paths ---------------------------------------------------------------------
    def path(self, agent: str, name: str = "") -> str:
        if not agent or "/" in agent or agent.startswith((".", "@")) or "/" in name:
            raise ValueError(f"bad agent id or file name: {agent!r} {name!r}")
        return os.path.join(self.mountpoint, agent, name) if name else os.path.join(self.mountpoint, agent)

    def last_error(self, agent: str, name: str) -> str | None:
        """Why the newest refused write of ``agent/name`` was refused (None: none kept)."""
        for p in (os.path.join(self.path(agent), "@rejected", name), self.path(agent, name)):
            try:
                return os.getxattr(p, LAST_ERROR).decode("utf-8", "replace")
            except OSError:
                continue
        return None

    def _reason(self, agent: str, name: str, exc: OSError) -> str:
        text = self.last_error(agent, name)
        if text and f"; pid {os.getpid()} " in text:
            return text
        return os.strerror(exc.errno) if exc.errno else str(exc)

    # -- reading ---------------------------------------------------------------------
    def read(self, agent: str, name: str = "config.json") -> tuple[Any, int]:
        """(document, version) of one consistent version; (None, 0) if the file does not exist."""
        p = self.path(agent, name)
        for _ in range(100):
            try:
                v1 = int(os.getxattr(p, VERSION))
                with open(p, "rb") as f:
                    data = f.read()
                if int(os.getxattr(p, VERSION)) != v1:
                    continue              # a new version landed while we read: read again
                return json.loads(data), v1
            except FileNotFoundError:
                if not os.path.isdir(self.path(agent)):
                    raise
                if not os.path.exists(p):
                    return None, 0
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOENT):
                    raise
        raise AgentStateError(errno.EAGAIN, f"{agent}/{name} kept changing while being read", p)

    # -- writing ---------------------------------------------------------------------
    def _write_fd(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def write(self, agent: str, name: str, doc: Any) -> None:
        """Replace the file's content with ``doc`` (durable when this returns)."""
        self.write_bytes(agent, name, _dumps(doc) + b"\n")

    def write_bytes(self, agent: str, name: str, data: bytes) -> None:
        p = self.path(agent, name)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_fd(fd, data)
        except OSError as exc:
            os.close(fd)
            raise Refused(exc.errno, os.strerror(exc.errno), p) from None
        try:
            os.close(fd)
        except OSError as exc:
            raise Refused(exc.errno, self._reason(agent, name, exc), p) from None

    def cas_write(self, agent: str, name: str, doc: Any, version: int) -> None:
        """Write ``doc`` only if the file is still at ``version`` (0: must not exist yet);
        ``Conflict`` otherwise. Atomic: temp file, ``if-version`` xattr, rename."""
        p = self.path(agent, name)
        tmp = self.path(agent, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_fd(fd, _dumps(doc) + b"\n")
        finally:
            os.close(fd)
        try:
            os.setxattr(tmp, IF_VERSION, str(int(version)).encode())
            os.rename(tmp, p)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno == errno.ESTALE:
                raise Conflict(errno.ESTALE, f"{agent}/{name} is no longer at version {version}", p) from None
            raise Refused(exc.errno, self._reason(agent, name, exc), p) from None

    def update(self, agent: str, name: str, fn: Callable[[Any], Any], tries: int = 1000) -> Any:
        """Read-modify-write without losing concurrent updates: ``fn(doc)`` (doc None if
        the file does not exist) returns the new document; retried on conflict."""
        for _ in range(tries):
            doc, version = self.read(agent, name)
            new = fn(doc)
            try:
                self.cas_write(agent, name, new, version)
                return new
            except Conflict:
                continue
        raise Conflict(errno.ESTALE, f"{agent}/{name}: still conflicting after {tries} tries")

    def patch(self, agent: str, name: str, patch: dict | list) -> None:
        """Apply a merge patch (dict, RFC 7396) or JSON Patch (list, RFC 6902) atomically to
        the current version. ``Conflict`` when a ``test`` op fails, ``Refused`` when the
        patch does not apply."""
        p = os.path.join(self.path(agent), "@patch", name)
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        try:
            self._write_fd(fd, _dumps(patch))
        except OSError as exc:
            os.close(fd)
            raise Refused(exc.errno, os.strerror(exc.errno), p) from None
        try:
            os.close(fd)
        except OSError as exc:
            reason = self._reason(agent, name, exc)
            cls = Conflict if exc.errno == errno.ESTALE else Refused
            raise cls(exc.errno, reason, self.path(agent, name)) from None

    # -- the change stream -------------------------------------------------------------
    def watch(self, agent: str | None = None) -> Iterator[dict]:
        """Yield every change from now on (dicts with seq, time, agent, file, op, commit,
        version, uid, pid; ``op == "lost"`` when this reader fell behind). Blocks
        between events; ends when the daemon stops."""
        fd = os.open(os.path.join(self.mountpoint, "@events"), os.O_RDONLY)
        rest = b""
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    ev = json.loads(line)
                    if agent is None or ev.get("agent") == agent or ev.get("op") == "lost":
                        yield ev
        finally:
            os.close(fd)


_default: Client | None = None


def _client(mountpoint: str | None) -> Client:
    global _default
    if mountpoint is not None:
        return Client(mountpoint)
    if _default is None:
        _default = Client()
    return _default


def read(agent: str, name: str = "config.json", *, mountpoint: str | None = None) -> tuple[Any, int]:
    return _client(mountpoint).read(agent, name)


def write(agent: str, name: str, doc: Any, *, mountpoint: str | None = None) -> None:
    _client(mountpoint).write(agent, name, doc)


def cas_write(agent: str, name: str, doc: Any, version: int, *, mountpoint: str | None = None) -> None:
    _client(mountpoint).cas_write(agent, name, doc, version)


def update(agent: str, name: str, fn: Callable[[Any], Any], *, mountpoint: str | None = None) -> Any:
    return _client(mountpoint).update(agent, name, fn)


def patch(agent: str, name: str, patch: dict | list, *, mountpoint: str | None = None) -> None:
    _client(mountpoint).patch(agent, name, patch)


def watch(agent: str | None = None, *, mountpoint: str | None = None) -> Iterator[dict]:
    return _client(mountpoint).watch(agent)


def last_error(agent: str, name: str, *, mountpoint: str | None = None) -> str | None:
    return _client(mountpoint).last_error(agent, name)
