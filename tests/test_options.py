"""Mount options: every numeric option is range-checked at parse time, before mounting."""

import math
import os
import signal
import subprocess
import sys

import pytest

from agentstatefs.daemon import fstab
from agentstatefs.daemon.options import HELP, RANGES, MountOptions

CLI = [sys.executable, "-m", "agentstatefs.daemon.cli"]
G = 1 << 30
M = 1 << 20


def parse(*items: str) -> MountOptions:
    return MountOptions.parse([",".join(items)])


def refused(item: str) -> str:
    with pytest.raises(ValueError) as ei:
        parse(item)
    msg = str(ei.value)
    assert msg.startswith(f"-o {item}: "), msg  # names the option and the value
    return msg


def test_defaults():
    o = MountOptions.parse(None)
    assert (o.max_size, o.runtime_versions, o.scratch_max, o.checkpoint_interval, o.pack_every) == \
        (16 * M, 10, 256 * M, 1.0, 2000)
    assert o.buffer_max == 256 * M and o.history_max == 10000


@pytest.mark.parametrize("item, attr, value", [
    ("checkpoint_interval=0.01", "checkpoint_interval", 0.01),
    ("checkpoint_interval=86400", "checkpoint_interval", 86400.0),
    ("checkpoint_interval=2.5", "checkpoint_interval", 2.5),
    ("max_size=1", "max_size", 1), ("max_size=1G", "max_size", G), ("max_size=512KiB", "max_size", 512 << 10),
    ("runtime_versions=1", "runtime_versions", 1), ("runtime_versions=1000", "runtime_versions", 1000),
    ("scratch_max=0", "scratch_max", 0), ("scratch_max=64G", "scratch_max", 64 * G),
    ("pack_every=0", "pack_every", 0), ("pack_every=123456789", "pack_every", 123456789),
    ("buffer_max=1M", "buffer_max", M), ("buffer_max=64G", "buffer_max", 64 * G),
    ("buffer_max=1048576", "buffer_max", M),
    ("history_max=100", "history_max", 100), ("history_max=10000000", "history_max", 10_000_000),
])
def test_in_range(item, attr, value):
    assert getattr(parse(item), attr) == value


@pytest.mark.parametrize("item, why", [
    ("checkpoint_interval=0", "must be > 0"),
    ("checkpoint_interval=-1", "must be > 0"),
    ("checkpoint_interval=-0.0", "must be > 0"),
    ("checkpoint_interval=0.001", "from 0.01 to 86400 seconds"),
    ("checkpoint_interval=86401", "from 0.01 to 86400 seconds"),
    ("checkpoint_interval=1e300", "from 0.01 to 86400 seconds"),
    ("checkpoint_interval=nan", "finite"), ("checkpoint_interval=NaN", "finite"),
    ("checkpoint_interval=inf", "finite"), ("checkpoint_interval=-inf", "finite"),
    ("checkpoint_interval=infinity", "finite"),
    ("checkpoint_interval=", "number of seconds"), ("checkpoint_interval=soon", "number of seconds"),
    ("max_size=0", "must be > 0 (from 1 byte to 1G)"), ("max_size=1025M", "from 1 byte to 1G"),
    ("max_size=2G", "1G"), ("max_size=" + "9" * 30, "bad size"), ("max_size=-1", "bad size"),
    ("max_size=16X", "bad size"), ("max_size=", "bad size"),
    ("runtime_versions=0", "must be > 0"), ("runtime_versions=-3", "must be > 0"),
    ("runtime_versions=1001", "from 1 to 1000"), ("runtime_versions=1.5", "whole number"),
    ("runtime_versions=nan", "whole number"), ("runtime_versions=" + "9" * 5000, "whole number"),
    ("scratch_max=65G", "from 0 to 64G"), ("scratch_max=-1", "bad size"), ("scratch_max=nan", "bad size"),
    ("pack_every=-1", "must be >= 0"), ("pack_every=x", "whole number"), ("pack_every=1e3", "whole number"),
    ("buffer_max=0", "must be > 0 (from 1M to 64G)"), ("buffer_max=1023K", "from 1M to 64G"),
    ("buffer_max=65G", "from 1M to 64G"), ("buffer_max=lots", "bad size"),
    ("history_max=99", "from 100 to 10000000"), ("history_max=0", "must be > 0"),
    ("history_max=10000001", "from 100 to 10000000"), ("history_max=inf", "whole number"),
])
def test_out_of_range_is_refused(item, why):
    assert why in refused(item)


def test_last_value_wins_and_each_is_checked():
    assert parse("history_max=200", "history_max=300").history_max == 300
    refused_later = pytest.raises(ValueError, parse, "checkpoint_interval=5", "checkpoint_interval=0")
    assert "checkpoint_interval=0" in str(refused_later.value)
    assert math.isclose(parse("checkpoint_interval=5").checkpoint_interval, 5)


def test_help_lists_every_numeric_option():
    for key in RANGES:
        assert f"  {key}=" in HELP
    assert "ENOSPC" in HELP.split("buffer_max=")[1].split("\n  runtime_versions")[0]


def test_fstab_helper_checks_options():
    assert fstab.main(["/tmp/r", "/tmp/m", "-f", "-o", "nofail,checkpoint_interval=0"]) == 1
    assert fstab.main(["/tmp/r", "/tmp/m", "-f", "-o", "nofail,buffer_max=1G,history_max=500"]) == 0


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_cli_refuses_before_mounting(tmp_path, value):
    mp = tmp_path / "m"
    proc = subprocess.Popen(CLI + ["mount", "--foreground", "--repo", str(tmp_path / "r"), str(mp),
                                   "-o", f"checkpoint_interval={value}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        raise
    finally:
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-uz", str(mp)])
            pytest.fail("a refused option still mounted")
    assert proc.returncode != 0
    assert f"checkpoint_interval={value}" in err and "agentstatefs:" in err, err
    assert "Traceback" not in err
    assert not os.path.ismount(mp)
    assert not (tmp_path / "r").exists()  # nothing created either
