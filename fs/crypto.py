"""Encryption at rest: keys, the store's encryption record, and the blob/record codecs.

An encrypted store seals every blob inside an agent's tree (``meta.json``,
``config.json``, ``memory.json``) and every journal record with AES-SIV (RFC 5297,
``cryptography``'s ``AESSIV``), a *deterministic* AEAD: the same plaintext at the same
place gives the same bytes, so an unchanged file still hashes to the same git blob and
makes no commit, and a past version written again is still recognised as a restore.

Keys: the master key is 64 random bytes (a key file holds them raw, as 128 hex digits or
as base64; ``agentstatefs keygen`` writes one). Two sub-keys are derived with
HKDF-SHA256 salted with the store's random 16-byte id, so two stores (tenants) never
share a sub-key even under the same master key, plus a key check value recorded in the
store so a wrong key is refused before anything is read or written.

Envelope: ``MAGIC`` (``\\0ASE`` + version byte 1) followed by AES-SIV's output (16-byte
synthetic IV + ciphertext). Associated data binds a blob to its place: the store id,
the agent id and the file name (a journal record: the store id and its sequence
number), so a blob copied to another agent, file or store does not open. JSON text
never starts with a NUL byte, so a plaintext blob in an encrypted store (or an
encrypted one in a plaintext store) is recognised and refused (``CryptoError``).

The record: ``REPO/agentstatefs/encryption.json`` (``{format, cipher, kdf, store_id,
key_check}``, 0600) plus ``agentstatefs.encrypted = true`` in the git config, a second
witness so that deleting the file does not turn the store into a "plaintext" one.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 64
STORE_ID_BYTES = 16
MAGIC = b"\x00ASE\x01"          # envelope, version 1
RECORD_NAME = "encryption.json"
CONFIG_KEY = "agentstatefs.encrypted"
CIPHER_NAME = "AES-SIV-512"
KDF_NAME = "HKDF-SHA256"
FORMAT = 1


class CryptoError(Exception):
    """A key, record or envelope that cannot be used (the message says why)."""


# -- keys ---------------------------------------------------------------------------
def parse_key(data: bytes) -> bytes:
    """The 64-byte master key from a key file's bytes: raw, hex or base64 (whitespace ignored)."""
    if len(data) == KEY_BYTES:
        return bytes(data)
    text = b"".join(data.split())
    if len(text) == 2 * KEY_BYTES:
        try:
            return binascii.unhexlify(text)
        except (binascii.Error, ValueError):
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == KEY_BYTES:
        return raw
    raise CryptoError(f"a key must be {KEY_BYTES} bytes: raw, {2 * KEY_BYTES} hex digits or base64 "
                      f"(got {len(data)} bytes that are none of these; 'agentstatefs keygen PATH' makes one)")


def read_keyfile(path: str) -> bytes:
    """The master key in ``path`` (CryptoError if unreadable or malformed)."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as exc:
        raise CryptoError(f"key file {path}: {exc.strerror}") from None
    try:
        return parse_key(data)
    except CryptoError as exc:
        raise CryptoError(f"key file {path}: {exc}") from None


def loose_key_file(path: str) -> bool:
    """True when group or others may read the key file (worth a warning)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def write_keyfile(path: str) -> None:
    """Create ``path`` (0600, never overwriting) holding a new random key as hex."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, binascii.hexlify(os.urandom(KEY_BYTES)) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def _derive(master: bytes, store_id: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=store_id, info=info).derive(master)


# -- codecs -------------------------------------------------------------------------
class Plain:
    """The codec of an unencrypted store: passes bytes through, refuses sealed ones."""

    encrypted = False
    store_id = b""

    def seal_blob(self, agent: str, name: str, data: bytes) -> bytes:
        return data

    def open_blob(self, agent: str, name: str, blob: bytes) -> bytes:
        if blob[:len(MAGIC)] == MAGIC:
            raise CryptoError(f"{agent}/{name}: encrypted blob in an unencrypted store (no key given)")
        return blob

    def seal_record(self, seq: int, payload: bytes) -> bytes:
        return payload

    def open_record(self, seq: int, payload: bytes) -> bytes:
        if payload[:len(MAGIC)] == MAGIC:
            raise CryptoError(f"journal record {seq} is encrypted but no key was given")
        return payload


PLAIN = Plain()


class Cipher:
    """The codec of an encrypted store: AES-SIV bound to (store, agent, file) or (store, seq)."""

    encrypted = True

    def __init__(self, master: bytes, store_id: bytes):
        if len(master) != KEY_BYTES:
            raise CryptoError(f"a key must be {KEY_BYTES} bytes")
        self.store_id = bytes(store_id)
        self._blob = AESSIV(_derive(master, self.store_id, b"agentstatefs v1 blobs", 64))
        self._record = AESSIV(_derive(master, self.store_id, b"agentstatefs v1 journal", 64))
        self.check = _derive(master, self.store_id, b"agentstatefs v1 key check", 32).hex()

    def _blob_ad(self, agent: str, name: str) -> list:
        return [b"blob", self.store_id, agent.encode(), name.encode()]

    def seal_blob(self, agent: str, name: str, data: bytes) -> bytes:
        return MAGIC + self._blob.encrypt(bytes(data), self._blob_ad(agent, name))

    def open_blob(self, agent: str, name: str, blob: bytes) -> bytes:
        if blob[:len(MAGIC)] != MAGIC:
            raise CryptoError(f"{agent}/{name}: plaintext blob in an encrypted store, refused")
        try:
            return self._blob.decrypt(blob[len(MAGIC):], self._blob_ad(agent, name))
        except InvalidTag:
            raise CryptoError(f"{agent}/{name}: blob does not decrypt here (another key, "
                              f"store or path, or tampered with)") from None

    def seal_record(self, seq: int, payload: bytes) -> bytes:
        return MAGIC + self._record.encrypt(bytes(payload), [b"record", self.store_id, b"%d" % seq])

    def open_record(self, seq: int, payload: bytes) -> bytes:
        if payload[:len(MAGIC)] != MAGIC:
            raise CryptoError(f"journal record {seq}: plaintext record in an encrypted store, refused")
        try:
            return self._record.decrypt(payload[len(MAGIC):], [b"record", self.store_id, b"%d" % seq])
        except InvalidTag:
            raise CryptoError(f"journal record {seq} does not decrypt (another key or store, "
                              f"or tampered with)") from None


# -- the store's record -------------------------------------------------------------
def record_path(repo_dir: str) -> str:
    return os.path.join(repo_dir, "agentstatefs", RECORD_NAME)


def read_record(repo_dir: str) -> dict | None:
    """The store's encryption record, None for a store that has none."""
    path = record_path(repo_dir)
    try:
        with open(path) as f:
            rec = json.load(f)
        bytes.fromhex(rec["store_id"]), bytes.fromhex(rec["key_check"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CryptoError(f"{path} is unreadable ({exc})") from None
    if rec.get("format") != FORMAT or rec.get("cipher") != CIPHER_NAME:
        raise CryptoError(f"{path}: unsupported encryption format {rec.get('format')!r}/{rec.get('cipher')!r}")
    return rec


def marked_encrypted(repo) -> bool:
    """The git config's witness (``repo``: a pygit2.Repository)."""
    try:
        return repo.config.get_bool(CONFIG_KEY)
    except (KeyError, ValueError):
        return False


def create_record(repo_dir: str, repo, master: bytes) -> Cipher:
    """Make ``repo_dir`` an encrypted store under ``master`` (new random store id)."""
    store_id = os.urandom(STORE_ID_BYTES)
    cipher = Cipher(master, store_id)
    meta = os.path.dirname(record_path(repo_dir))
    os.makedirs(meta, mode=0o700, exist_ok=True)
    rec = {"format": FORMAT, "cipher": CIPHER_NAME, "kdf": KDF_NAME,
           "store_id": store_id.hex(), "key_check": cipher.check}
    tmp = record_path(repo_dir) + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(rec, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, record_path(repo_dir))
    dfd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    repo.config[CONFIG_KEY] = True
    return cipher


def codec_for(repo_dir: str, repo, key: bytes | None, *, fresh: bool, create: bool):
    """The codec to read and write ``repo_dir`` with, or CryptoError saying why not.

    ``fresh``: the store holds nothing yet (no commit, no journal record), so a key may
    start an encrypted store (only if ``create``). A key for a store with plaintext
    state is refused: encrypting existing state is ``agentstatefs encrypt``'s job.
    """
    rec = read_record(repo_dir)
    if rec is None:
        if marked_encrypted(repo):
            raise CryptoError(f"{repo_dir} is marked encrypted in its git config but "
                              f"agentstatefs/{RECORD_NAME} is missing; restore it from a backup")
        if key is None:
            return PLAIN
        if not fresh:
            raise CryptoError(f"{repo_dir} holds unencrypted state and a key was given; refusing to mix "
                              f"them (encrypt it into a new repository with 'agentstatefs encrypt', "
                              f"or mount without a key)")
        if not create:
            raise CryptoError(f"{repo_dir} is not encrypted (a key was given)")
        return create_record(repo_dir, repo, key)
    if key is None:
        raise CryptoError(f"{repo_dir} is encrypted: give its key (-o keyfile=PATH, the systemd "
                          f"credential 'key', or --keyfile for the other verbs)")
    cipher = Cipher(key, bytes.fromhex(rec["store_id"]))
    if not hmac.compare_digest(cipher.check, rec["key_check"]):
        raise CryptoError(f"wrong key for {repo_dir} (its key check value does not match)")
    return cipher
