"""check_json / check_size in process (no mount): what a state file may hold."""

import errno
import json
import random

import pytest

from agentstatefs.fs import validate
from agentstatefs.fs.errors import FsError
from agentstatefs.fs.validate import MAX_DEPTH, check_json, check_size


def refused(data: bytes) -> str:
    with pytest.raises(FsError) as ei:
        check_json(data)
    assert ei.value.errno == errno.EINVAL
    assert "Traceback" not in ei.value.reason and "\n" not in ei.value.reason
    return ei.value.reason


DEEP = f"JSON nested deeper than {MAX_DEPTH} levels"


def test_max_depth_is_512():
    assert MAX_DEPTH == 512


@pytest.mark.parametrize("data", [
    b"{}", b"[]", b"0", b"-1.5e-300", b'"text"', b"true", b"null", b' \n\t{"a": [1, 2]}\r\n ',
    '{"ünïcödé": "✓ 日本"}'.encode(), b'"\\ud800"',  # a lone surrogate escape: accepted as Python does
    b'{"a": 1, "a": 2}', b"[1e999]",
])
def test_valid(data):
    check_json(data)


@pytest.mark.parametrize("data, why", [
    (b"", "empty file"), (b" \n\t ", "empty file"),
    (b"\xef\xbb\xbf{}", "byte order mark"),
    (b'{"a": "\xff"}', "not UTF-8 at byte 7"), (b"\xed\xa0\x80", "not UTF-8"),  # encoded surrogate
    (b"NaN", "NaN is not valid JSON"), (b"[Infinity]", "Infinity"), (b"[-Infinity]", "-Infinity"),
    (b"{} x", "invalid JSON: Extra data"), (b"{}{}", "Extra data"), (b"[1,]", "invalid JSON"),
    (b"{oops", "invalid JSON"), (b"[01]", "invalid JSON"), (b"'a'", "invalid JSON"),
    (b'"unterminated', "invalid JSON: Unterminated string"), (b"[1, 2", "invalid JSON"),
])
def test_invalid(data, why):
    assert why in refused(data)


def test_message_is_short_and_human():
    assert refused(b"[x]") == "invalid JSON: Expecting value: line 1 column 2 (char 1)"


@pytest.mark.parametrize("open_, close", [(b"[", b"]"), (b'{"k":', b"}"), (b'[{"k":', b"}]")])
def test_depth_limit_exact(open_, close):
    def nest(levels):
        per = open_.count(b"[") + open_.count(b"{")
        n, rest = divmod(levels, per)
        doc = open_ * n + b"0" + close * n
        return b"[" * rest + doc + b"]" * rest
    check_json(nest(MAX_DEPTH))
    assert refused(nest(MAX_DEPTH + 1)) == DEEP


@pytest.mark.parametrize("levels", [1000, 5000, 100_000])
def test_very_deep_is_einval_not_recursion_error(levels):
    assert refused(b"[" * levels + b"]" * levels) == DEEP
    assert refused(b'{"a":' * levels + b"1" + b"}" * levels) == DEEP


def test_deep_and_truncated_is_still_einval():
    assert refused(b"[" * 100_000) == DEEP


def test_brackets_inside_strings_do_not_count():
    check_json(json.dumps(["[" * 5000, "{" * 5000]).encode())
    check_json(b'"' + b"[" * 5000 + b'"')
    check_json(b'["\\"' + b"[" * 5000 + b'"]')        # escaped quote: still inside
    check_json(b'["\\\\", ' + b"[" * 500 + b"]" * 500 + b"]")  # escaped backslash ends before "
    # ... and brackets after an escaped backslash at a string's end do count
    assert refused(b'["\\\\", ' + b"[" * 600 + b"]" * 600 + b"]") == DEEP
    # a document just past the limit, with brackets and escapes in its strings
    s = '\\"[{' * 50
    deep = ("[" + json.dumps(s) + ",") * (MAX_DEPTH + 1) + "0" + "]" * (MAX_DEPTH + 1)
    assert refused(deep.encode()) == DEEP
    ok = ("[" + json.dumps(s) + ",") * MAX_DEPTH + "0" + "]" * MAX_DEPTH
    check_json(ok.encode())


def test_recursion_error_is_caught(monkeypatch):
    monkeypatch.setattr(validate, "_too_deep", lambda data: False)
    assert refused(b"[" * 100_000 + b"]" * 100_000) == DEEP


def _depth(obj) -> int:
    if isinstance(obj, list):
        return 1 + max(map(_depth, obj), default=0)
    if isinstance(obj, dict):
        return 1 + max(map(_depth, obj.values()), default=0)
    return 0


def _random_doc(rng: random.Random, budget: int):
    kind = rng.random()
    if budget <= 0 or kind < 0.3:
        return rng.choice([0, -1.5, True, None, "x", '["{\\', "\\", '"', "a\\\\\"[[[", "]]}}", ""])
    if kind < 0.65:
        return [_random_doc(rng, budget - 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["[", "{", '"', "\\", "k"]) + str(i): _random_doc(rng, budget - 1)
            for i in range(rng.randrange(4))}


def test_prescan_agrees_with_real_depth(monkeypatch):
    """The byte pre-scan measures the same depth as the parsed document."""
    rng = random.Random(8)
    for limit in (1, 2, 3, 5):
        monkeypatch.setattr(validate, "MAX_DEPTH", limit)
        for _ in range(400):
            doc = _random_doc(rng, 8)
            for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False, indent=1)):
                assert validate._too_deep(text.encode()) == (_depth(doc) > limit), text


@pytest.mark.parametrize("digits", [4301, 5000, 100_000])
def test_huge_integers_are_valid(digits):
    check_json(b"1" * digits)
    check_json(b'{"n": -' + b"9" * digits + b"}")
    check_json(b"[" + b"7" * digits + b".5e-3]")


def test_16_mib_of_valid_json_is_checked():
    item = {"id": 12345, "name": 'agent "x" \\ [{', "tags": ["a", {"k": [1, 2.5, None, True]}],
            "text": "lorem ipsum " * 4}
    one = len(json.dumps(item)) + 2
    big = json.dumps([item] * ((16 << 20) // one)).encode()
    assert len(big) > 15 << 20
    check_json(big)
    nested = b"[" + b",".join([b"[" * 300 + b"1" + b"]" * 300] * ((16 << 20) // 604)) + b"]"
    check_json(nested)


def test_check_size():
    check_size(16 << 20, 16 << 20)
    with pytest.raises(FsError) as ei:
        check_size((16 << 20) + 1, 16 << 20)
    assert ei.value.errno == errno.EFBIG


def test_garbage_collection_stays_on():
    import gc
    check_json(b"[[1], {}]")
    assert gc.isenabled()
    refused(b"[1,]")
    assert gc.isenabled()
    gc.disable()
    try:
        check_json(b"[]")
        assert not gc.isenabled()
    finally:
        gc.enable()
