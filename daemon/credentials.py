"""systemd credentials: secrets handed to the daemon as files, not as arguments or env.

A unit (or a drop-in) with ``LoadCredential=key:/etc/agentstatefs/TENANT.key`` makes
systemd copy that file into a private, read-only directory before the daemon starts and
point ``$CREDENTIALS_DIRECTORY`` at it. The repository encryption key is read with
``repository_key()``: an explicit key file first, else the credential ``key``; units
without the credential keep working (no key, an unencrypted store).
"""

from __future__ import annotations

import logging
import os

from ..fs import crypto

log = logging.getLogger("agentstatefs")

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


def repository_key(keyfile: str | None) -> bytes | None:
    """The store's master key: from ``keyfile`` if given, else the systemd credential
    ``key``, else None. CredentialError says why a key that was given cannot be used."""
    try:
        if keyfile:
            if crypto.loose_key_file(keyfile):
                log.warning("key file %s is readable by group or others; chmod 600 it", keyfile)
            return crypto.read_keyfile(keyfile)
        data = read_credential("key")
        return None if data is None else crypto.parse_key(data)
    except crypto.CryptoError as exc:
        raise CredentialError(str(exc) if keyfile else f"credential 'key': {exc}") from None
