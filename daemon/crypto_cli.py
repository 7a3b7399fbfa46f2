"""Encryption verbs: ``keygen`` (a new key file) and ``encrypt`` (an encrypted copy of a store)."""

from __future__ import annotations

import os
import sys

from ..fs import crypto
from ..fs.errors import RepoError
from .credentials import CredentialError, repository_key
from .options import DEFAULT_REPO_ROOT, DEFAULT_TENANT


def cmd_keygen(args) -> int:
    try:
        crypto.write_keyfile(args.path)
    except FileExistsError:
        print(f"agentstatefs: {args.path} exists; not overwriting a key", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agentstatefs: {args.path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote a new {crypto.KEY_BYTES}-byte key to {args.path} (mode 0600); keep a copy "
          f"elsewhere: without it the store cannot be read")
    return 0


def cmd_encrypt(args) -> int:
    from ..fs.migrate import encrypt_copy
    try:
        key = repository_key(args.keyfile)
        if key is None:
            raise CredentialError("encrypt needs --keyfile (or the systemd credential 'key')")
        counts = encrypt_copy(args.repo, args.dest, key)
    except (CredentialError, RepoError) as exc:
        print(f"agentstatefs: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agentstatefs: {exc}", file=sys.stderr)
        return 1
    print(f"encrypted copy of {args.repo} in {args.dest}: {counts['commits']} commits, "
          f"{counts['blobs']} blobs sealed, {counts['objects']} objects; checked against the source. "
          f"Swap the directories, mount with -o keyfile=..., then destroy {args.repo} (plaintext).")
    return 0


def register(sub) -> None:
    default_repo = os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
    p = sub.add_parser("keygen", help="write a new random encryption key (0600, never overwrites)")
    p.add_argument("path")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("encrypt", help="copy an unmounted store, with its whole history, into a new "
                                       "encrypted repository",
                       description="Copy every commit of REPO's main into DEST (a new directory) with "
                                   "state files and metadata encrypted under the key. REPO is not "
                                   "changed; the copy is checked against it before this returns.")
    p.add_argument("dest", help="new repository directory (must not exist or be empty)")
    p.add_argument("--repo", default=default_repo, help="the unencrypted store (not mounted)")
    p.add_argument("--keyfile", help="the key (default: the systemd credential 'key')")
    p.set_defaults(func=cmd_encrypt)
