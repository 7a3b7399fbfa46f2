"""Mount options (``-o``): parsing, defaults, and the set passed to libfuse."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DEFAULT_REPO_ROOT = "/var/lib/agentstatefs"
DEFAULT_TENANT = "default"
DEFAULT_MOUNTPOINT = "/mnt/agents"

HELP = """\
mount options (-o opt[,opt...], may be repeated):
  allow_other           let users other than the mounting one use the mount
                        (the daemon checks every access: owner, group, mode, ACLs)
  default_permissions   accepted for compatibility; the daemon makes the checks itself
  root_mode=MODE        mode of the mount root, octal (default 0755, owner = the mounting
                        user); 1777 lets any user create agents (sticky, as /tmp)
  admin_group=NAME      members of this group (name or number) read and write everything
  audit=PATH            append a JSON line per write, delete, rename, restore, mode/owner/ACL
                        change and per denied attempt to PATH (reopened on SIGHUP)
  audit_reads           also audit opens for reading (needs audit=PATH)
  ro                    mount read-only: every write fails with EROFS
  fsname=NAME           source name shown in /proc/mounts and df (default agentstatefs:REPO)
  history=hidden|visible  list @history directories in readdir (default hidden;
                        they resolve by name either way)
  max_size=SIZE         size cap per state file, e.g. 16M (default 16M, 1 byte to 1G); larger -> EFBIG
  buffer_max=SIZE       total RAM for open state-file write buffers (default 256M, 1M to 64G);
                        a write past it gets ENOSPC
  runtime_versions=N    versions of runtime.json kept in RAM (default 10, 1 to 1000)
  scratch_max=SIZE      total RAM for scratch files of the mount (default 256M, 0 to 64G); past it -> ENOSPC
  history_max=N         most entries returned when listing one @history directory, newer first
                        (default 10000, 100 to 10000000)
  checkpoint_interval=SECONDS  how often git objects are synced and the journal trimmed
                        (default 1, 0.01 to 86400)
  pack_every=N          also combine the per-group git packs every N commits (default 2000;
                        0 = only when there are more than 16 packs, which always applies)
  replicate=URL         push branch main to this git remote in the background (ssh://, https://,
                        git://, file:// or a path; no commas); force-pushed with lease after a prune
  replicate_interval=SECONDS  how often to push when main moved (default 5, 0.05 to 86400)
  replica_interval=SECONDS    with --replica: how often to fetch the remote (default 5, 0.05 to 86400)
  keyfile=PATH          encrypt the store at rest with the key in PATH (64 bytes: raw, hex or
                        base64; 'agentstatefs keygen PATH' makes one). Without it the systemd
                        credential 'key' is used if the service has one. A new store is
                        encrypted from its first write; an existing one must already be
                        (see 'agentstatefs encrypt'); a wrong or missing key refuses the mount
  metrics_listen=HOST:PORT  also serve M/@metrics over HTTP for Prometheus at
                        http://HOST:PORT/metrics (default: no listener; e.g. 127.0.0.1:9464,
                        [::1]:9464; a port already taken makes the mount fail)
  stats_interval=SECONDS  how often the repository size on disk is measured, in the
                        background (default 60, 1 to 86400)
  slow_commit_ms=MS     log a warning when a commit group takes longer (default 1000;
                        0 = every group, for debugging; warnings are rate-limited)
  slow_fsync_ms=MS      log a warning when a journal fdatasync takes longer (default 500)
  replication_lag_warn=SECONDS  log a warning when replication is further behind
                        (default 300)
SIZE is a number of bytes with an optional K, M or G suffix (powers of 1024), e.g. 512K, 16M.
"""

_SIZE = re.compile(r"(\d{1,20})([KMG]?)i?B?", re.I | re.A)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 4096, 512K, 16M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    for suffix in ("G", "M", "K"):
        if n >= _UNITS[suffix] and n % _UNITS[suffix] == 0:
            return f"{n // _UNITS[suffix]}{suffix}"
    return f"{n} byte" if n == 1 else str(n)


# Accepted ranges (inclusive) of the numeric options.
RANGES: dict[str, tuple] = {
    "max_size": (1, 1 << 30),
    "buffer_max": (1 << 20, 64 << 30),
    "scratch_max": (0, 64 << 30),
    "runtime_versions": (1, 1000),
    "history_max": (100, 10_000_000),
    "checkpoint_interval": (0.01, 86400.0),
    "pack_every": (0, None),
    "replicate_interval": (0.05, 86400.0),
    "replica_interval": (0.05, 86400.0),
    "stats_interval": (1.0, 86400.0),
    "slow_commit_ms": (0, 3_600_000),
    "slow_fsync_ms": (0, 3_600_000),
    "replication_lag_warn": (1.0, 10_000_000.0),
}
_SIZES = ("max_size", "buffer_max", "scratch_max")
_INTS = ("runtime_versions", "history_max", "pack_every", "slow_commit_ms", "slow_fsync_ms")


def _in_range(key: str, value, show=str, unit: str = ""):
    lo, hi = RANGES[key]
    if hi is None:
        if value < lo:
            raise ValueError(f"must be >= {show(lo)}")
    elif not lo <= value <= hi:
        if value <= 0 < lo:
            raise ValueError(f"must be > 0 (from {show(lo)} to {show(hi)}{unit})")
        raise ValueError(f"must be from {show(lo)} to {show(hi)}{unit}")
    return value


def parse_number(key: str, text: str):
    """Parse and range-check the value of a numeric option (ValueError says why)."""
    text = text.strip()
    if key in _SIZES:
        return _in_range(key, parse_size(text), format_size)
    if key in _INTS:
        if not re.fullmatch(r"\+?\d{1,18}|-\d{1,18}", text, re.A):
            raise ValueError("must be a whole number")
        return _in_range(key, int(text))
    try:  # seconds
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number of seconds")
    return _in_range(key, value, lambda x: f"{x:g}", " seconds")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not re.fullmatch(r"\d{1,5}", port, re.A) or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", host, re.A):
        raise ValueError(f"bad host {host[:60]!r}")
    return host, int(port)


def _group_id(value: str) -> int:
    import grp
    if re.fullmatch(r"\d{1,10}", value, re.A):
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"no group named {value!r}") from None


@dataclass
class MountOptions:
    allow_other: bool = False
    ro: bool = False
    fsname: str = ""
    history_visible: bool = False
    max_size: int = 16 << 20
    runtime_versions: int = 10
    scratch_max: int = 256 << 20
    checkpoint_interval: float = 1.0
    pack_every: int = 2000
    buffer_max: int = 256 << 20
    history_max: int = 10000
    replicate: str = ""
    replicate_interval: float = 5.0
    replica_interval: float = 5.0
    replica: str = ""            # set by mount --replica URL (not a -o option)
    keyfile: str = ""
    metrics_listen: tuple[str, int] | None = None
    stats_interval: float = 60.0
    slow_commit_ms: int = 1000
    slow_fsync_ms: int = 500
    replication_lag_warn: float = 300.0
    root_mode: int = 0o755
    admin_group: str = ""
    admin_gid: int | None = None
    audit: str = ""
    audit_reads: bool = False

    @classmethod
    def parse(cls, groups: list[str] | None) -> "MountOptions":
        o = cls()
        for group in groups or []:
            for item in group.split(","):
                item = item.strip()
                if not item:
                    continue
                key, _, value = item.partition("=")
                try:
                    if key == "allow_other":
                        o.allow_other = True
                    elif key in ("default_permissions", "rw", "dev", "suid", "nodev", "nosuid",
                                 "exec", "noexec", "auto", "noauto", "nofail", "_netdev", "user", "users"):
                        if key == "rw":
                            o.ro = False
                    elif key == "ro":
                        o.ro = True
                    elif key == "replicate":
                        from ..fs.replicate import check_url
                        o.replicate = check_url(value)
                    elif key == "keyfile":
                        if not value:
                            raise ValueError("keyfile needs a path")
                        o.keyfile = value
                    elif key == "fsname":
                        o.fsname = value
                    elif key == "history":
                        if value not in ("hidden", "visible"):
                            raise ValueError("history must be hidden or visible")
                        o.history_visible = value == "visible"
                    elif key == "metrics_listen":
                        o.metrics_listen = parse_listen(value)
                    elif key == "root_mode":
                        if not re.fullmatch(r"[0-7]{1,4}", value, re.A) or int(value, 8) & ~0o1777:
                            raise ValueError("must be an octal mode such as 0755 or 1777")
                        o.root_mode = int(value, 8)
                    elif key == "admin_group":
                        o.admin_group, o.admin_gid = value, _group_id(value)
                    elif key == "audit":
                        if not value:
                            raise ValueError("needs a file name: audit=PATH")
                        o.audit = value
                    elif key == "audit_reads":
                        o.audit_reads = True
                    elif key in RANGES:
                        setattr(o, key, parse_number(key, value))
                    else:
                        raise ValueError(f"unknown mount option {key!r}")
                except ValueError as exc:
                    raise ValueError(f"-o {item}: {exc}") from None
        if o.audit_reads and not o.audit:
            raise ValueError("-o audit_reads needs -o audit=PATH")
        return o

    def fuse_options(self, repo: str) -> set[str]:
        # No default_permissions: the daemon checks every access itself (fs/access.py), so
        # that it sees every denial (audit log) and can apply ACLs and history rules.
        opts = {"subtype=agentstatefs",
                f"fsname={self.fsname or 'agentstatefs:' + repo}"}
        if self.allow_other:
            opts.add("allow_other")
        if self.ro:
            opts.add("ro")
        return opts
