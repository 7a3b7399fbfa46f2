"""systemd credentials: secrets handed to the daemon as files, not as arguments or env.

A unit (or a drop-in) with ``LoadCredential=key:/etc/agentstatefs/TENANT.key`` makes
systemd copy that file into a private, read-only directory before the daemon starts and
point ``$CREDENTIALS_DIRECTORY`` at it. The repository encryption key will be read with
``read_credential("key")``; units without the credential keep working (None).
"""

from __future__ import annotations

import os

MAX_SIZE = 64 << 10


class CredentialError(Exception):
    """A credential exists but cannot be used (unreadable, too large, bad name)."""


def read_credential(name: str, max_size: int = MAX_SIZE) -> bytes | None:
    """The bytes of credential ``name``, or None if the service was given none."""
    if not name or "/" in name or name in (".", ".."):
        raise CredentialError(f"bad credential name {name!r}")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as f:
            data = f.read(max_size + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialError(f"credential {name!r} ({path}) is unreadable: {exc.strerror}") from None
    if len(data) > max_size:
        raise CredentialError(f"credential {name!r} is larger than {max_size} bytes")
    return data
