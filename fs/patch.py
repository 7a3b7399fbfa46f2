"""Partial updates: an RFC 7396 merge patch (a JSON object) or an RFC 6902 JSON Patch
(a JSON array) applied to a state file's current content.

Pure functions: the store calls ``apply_patch`` while resolving a patch intent in the
committer thread, against the newest head, so a patch always applies to the version
current at its turn in the queue (never to a version read earlier by the caller).

The result is written back as JSON in the file's own style (compact, or indented as
its second line is), numbers in their shortest form (``1.50`` becomes ``1.5``). A patch
that changes nothing makes no new version.
"""

from __future__ import annotations

import errno
import json

import jsonpatch
import jsonpointer

from .errors import FsError

MERGE = "merge patch"
JSON_PATCH = "json patch"


def _load(data: bytes, what: str):
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FsError(errno.EINVAL, f"{what} is not valid JSON: {exc}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def merge(target, patch):
    """RFC 7396 MergePatch(target, patch)."""
    if isinstance(patch, dict):
        out = dict(target) if isinstance(target, dict) else {}
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(out.get(k), v)
        return out
    return patch


def _style(current: bytes | None) -> dict:
    if current is None:
        return {"indent": None}
    text = current.strip()
    nl = text.find(b"\n")
    if nl < 0:
        return {"indent": None}
    line = text[nl + 1:]
    indent = len(line) - len(line.lstrip(b" "))
    if line[:1] == b"\t":
        return {"indent": "\t"}
    return {"indent": indent or 2}


def dump(doc, current: bytes | None) -> bytes:
    try:
        text = json.dumps(doc, ensure_ascii=False, allow_nan=False, **_style(current))
    except ValueError as exc:        # a number too large for a float (1e400)
        raise FsError(errno.EINVAL, f"the patched document cannot be written: {exc}") from None
    end = b"\n" if current is None or current.endswith(b"\n") else b""
    return text.encode("utf-8") + end


def apply_patch(current: bytes | None, patch: bytes) -> tuple[bytes | None, str]:
    """(new content or None when nothing changes, kind of patch).

    ``current`` None: the file does not exist; a merge patch then applies to nothing
    (creates the file), a JSON Patch refuses with ENOENT.
    EINVAL when the patch is not a patch or does not apply; ESTALE when a JSON Patch
    ``test`` operation fails (the document is not what the caller expected)."""
    p = _load(patch, "the patch")
    if isinstance(p, dict):
        kind = MERGE
        doc = _load(current, "the current version") if current is not None else None
        try:
            new = merge(doc, p)
        except RecursionError:
            raise FsError(errno.EINVAL, "merge patch nested too deeply") from None
    elif isinstance(p, list):
        kind = JSON_PATCH
        if current is None:
            raise FsError(errno.ENOENT, "a JSON Patch needs an existing file (a merge patch may create it)")
        doc = _load(current, "the current version")
        try:
            new = jsonpatch.JsonPatch(p).apply(doc, in_place=False)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise FsError(errno.ESTALE, f"JSON Patch test failed: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise FsError(errno.EINVAL, f"JSON Patch does not apply: {exc}") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise FsError(errno.EINVAL, f"JSON Patch does not apply: {type(exc).__name__}: {exc}") from None
        except RecursionError:
            raise FsError(errno.EINVAL, "JSON Patch: document nested too deeply") from None
    else:
        raise FsError(errno.EINVAL, "a patch is a JSON object (RFC 7396 merge patch) or a JSON array "
                                    "(RFC 6902 JSON Patch)")
    if current is not None and new == doc and type(new) is type(doc):
        return None, kind
    return dump(new, current), kind
