"""RAM-only runtime layer: ``runtime.json`` per agent, last K versions, never on disk."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .changes import Who


@dataclass
class RuntimeVersion:
    version: int
    data: bytes
    time_ns: int
    who: Who


@dataclass
class RuntimeFile:
    mode: int
    uid: int
    gid: int
    versions: deque = field(default_factory=deque)
    counter: int = 0
    acl: list | None = None      # extended ACL entries (fs/access.py)

    @property
    def current(self) -> RuntimeVersion:
        return self.versions[-1]


class RuntimeLayer:
    """Holds each agent's runtime.json in memory only."""

    def __init__(self, keep: int = 10):
        self.keep = max(1, keep)
        self._files: dict[str, RuntimeFile] = {}
        self.bytes = 0     # every kept version's bytes (kept as a running total for the metrics)

    def get(self, agent: str) -> RuntimeFile | None:
        return self._files.get(agent)

    def put(self, agent: str, data: bytes, who: Who, time_ns: int, mode: int = 0o644) -> RuntimeVersion | None:
        """Store a new version; None when the content is unchanged (no new version)."""
        rf = self._files.get(agent)
        if rf is None:
            rf = self._files[agent] = RuntimeFile(mode=mode, uid=who.uid, gid=who.gid,
                                                  versions=deque(maxlen=self.keep))
        elif rf.versions and rf.current.data == data:
            return None
        rf.counter += 1
        v = RuntimeVersion(rf.counter, bytes(data), time_ns, who)
        if len(rf.versions) == rf.versions.maxlen:
            self.bytes -= len(rf.versions[0].data)
        rf.versions.append(v)
        self.bytes += len(v.data)
        return v

    def move(self, agent: str, new: str) -> None:
        """The agent was renamed: its runtime.json goes with it."""
        rf = self._files.pop(agent, None)
        if rf is not None:
            self._files[new] = rf

    def remove(self, agent: str) -> bool:
        rf = self._files.pop(agent, None)
        if rf is None:
            return False
        self.bytes -= sum(len(v.data) for v in rf.versions)
        return True

    def total_bytes(self) -> int:
        return sum(len(v.data) for rf in self._files.values() for v in rf.versions)
