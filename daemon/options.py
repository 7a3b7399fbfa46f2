"""Mount options (``-o``): parsing, defaults, and the set passed to libfuse."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REPO_ROOT = "/var/lib/agentstatefs"
DEFAULT_TENANT = "default"
DEFAULT_MOUNTPOINT = "/mnt/agents"

HELP = """\
mount options (-o opt[,opt...], may be repeated):
  allow_other           let users other than the mounting one use the mount
                        (permission checks stay on: default_permissions is implied)
  default_permissions   accepted for compatibility; always in effect
  ro                    mount read-only: every write fails with EROFS
  fsname=NAME           source name shown in /proc/mounts and df (default agentstatefs:REPO)
  history=hidden|visible  list @history directories in readdir (default hidden;
                        they resolve by name either way)
  max_size=SIZE         size cap per state file, e.g. 16M (default 16M); larger -> EFBIG
  runtime_versions=N    versions of runtime.json kept in RAM (default 10)
  scratch_max=SIZE      total RAM for scratch files of the mount (default 256M); past it -> ENOSPC
  checkpoint_interval=SECONDS  how often git objects are synced and the journal trimmed (default 1)
  pack_every=N          pack loose git objects in the background after N commits (default 2000; 0 = never)
"""

_SIZE = re.compile(r"(\d+)([KMG]?)i?B?", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 4096, 512K, 16M, 1G)")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


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
                    elif key == "fsname":
                        o.fsname = value
                    elif key == "history":
                        if value not in ("hidden", "visible"):
                            raise ValueError("history must be hidden or visible")
                        o.history_visible = value == "visible"
                    elif key == "max_size":
                        o.max_size = parse_size(value)
                    elif key == "runtime_versions":
                        o.runtime_versions = int(value)
                        if o.runtime_versions < 1:
                            raise ValueError("runtime_versions must be >= 1")
                    elif key == "scratch_max":
                        o.scratch_max = parse_size(value)
                    elif key == "checkpoint_interval":
                        o.checkpoint_interval = float(value)
                    elif key == "pack_every":
                        o.pack_every = int(value)
                    else:
                        raise ValueError(f"unknown mount option {key!r}")
                except ValueError as exc:
                    raise ValueError(f"-o {item}: {exc}") from None
        return o

    def fuse_options(self, repo: str) -> set[str]:
        opts = {"default_permissions", "subtype=agentstatefs",
                f"fsname={self.fsname or 'agentstatefs:' + repo}"}
        if self.allow_other:
            opts.add("allow_other")
        if self.ro:
            opts.add("ro")
        return opts
