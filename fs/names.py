"""Names in the namespace: agent ids, state file names, reserved ``@`` names."""

import errno
import re

from .errors import FsError

DURABLE_FILES = ("config.json", "memory.json")
RUNTIME_FILE = "runtime.json"
STATE_FILES = DURABLE_FILES + (RUNTIME_FILE,)
META_FILE = "meta.json"  # per-agent metadata blob inside the agent's git tree
HISTORY_DIR = "@history"

_AGENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
NAME_MAX = 255


def check_agent_id(name: str) -> str:
    """Return ``name`` if it is a valid agent id, else raise EINVAL.

    Agent id: 1-128 bytes of ``[A-Za-z0-9._-]``, not starting with ``.`` or ``@``.
    """
    if not _AGENT_ID.fullmatch(name) or name[0] == "." or name in (".", ".."):
        raise FsError(errno.EINVAL, f"invalid agent id {name!r}: use 1-128 of [A-Za-z0-9._-], not starting with '.'")
    return name


def is_reserved(name: str) -> bool:
    """``@`` names are reserved for the filesystem's own views."""
    return name.startswith("@")


def decode_name(raw: bytes) -> str:
    """Decode a name from the kernel; names that are not UTF-8 or too long are refused."""
    if len(raw) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    if b"/" in raw or b"\0" in raw:
        raise FsError(errno.EINVAL, "name contains '/' or NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EINVAL, f"name is not UTF-8: {raw!r}") from None


def is_durable(name: str) -> bool:
    return name in DURABLE_FILES


def is_state(name: str) -> bool:
    return name in STATE_FILES
