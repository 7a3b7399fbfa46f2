"""The real unit template under a real systemd, and the mount(8) helper.

systemd 252 runs as PID 1 of throw-away namespaces (tests/sdns.py). The unit is
systemd/agentstatefs@.service rendered by the installer's own function with two paths
changed for the test: the agentstatefs command (this checkout's venv) and the tenant
settings directory (a temp dir). Inside the namespace only, a temp dir is bind-mounted
over /var/lib (so StateDirectory= stays off the host) and over /mnt (so the default
tenant's /mnt/agents does too). Mount points of the two test tenants live in a shared
bind mount, so the host sees them exactly as it would see /mnt/agents.

Every test leaves the host's mounts, cgroups and sysctls as it found them (checked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentstatefs.daemon import install
from sdns import SystemdNS

HERE = Path(__file__).resolve().parent
BIN = str(Path(sys.executable).with_name("agentstatefs"))
HELPER = str(Path(sys.executable).with_name(install.HELPER_NAME))
UNIT_FILE = HERE.parent / "systemd" / install.UNIT_NAME

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_systemd = pytest.mark.skipif(
    not os.path.exists("/lib/systemd/systemd") or shutil.which("systemd-analyze") is None,
    reason="needs the systemd package (installed by .ci/setup)")

SYSCTLS = ["net/unix/max_dgram_qlen", "fs/file-max", "fs/nr_open", "kernel/pid_max",
           "kernel/core_pattern", "fs/inotify/max_user_instances", "fs/inotify/max_user_watches",
           "kernel/printk"]


def wait_for(pred, timeout=60.0, what="condition"):
    """Poll ``pred`` until true; returns seconds waited (a safety net, not a timing check)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what} after {timeout}s")


def host_state(ignore_under: str) -> dict:
    """Mounts (with options), cgroup directories and sysctls of the host, for comparison.

    Mounts under ``ignore_under`` (pytest's temp root) and FUSE mounts are left out: other
    tests and people on the machine mount and unmount those while we run. Our own temp
    dir and /mnt/agents are checked separately.
    """
    mounts = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mp = parts[4].encode().decode("unicode_escape")
            if mp.startswith(ignore_under) or parts[sep + 1].startswith("fuse"):
                continue  # others' test mounts come and go; ours are checked by path
            mounts.add((mp, parts[5], parts[sep + 1], parts[sep + 3]))
    cgroups = set()
    for top in os.listdir("/sys/fs/cgroup"):
        cgroups.add(top)
        path = f"/sys/fs/cgroup/{top}"
        if os.path.isdir(path) and not os.path.islink(path):
            cgroups.update(f"{top}/{d}" for d in os.listdir(path) if os.path.isdir(f"{path}/{d}"))
    sysctls = {}
    for s in SYSCTLS:
        try:
            sysctls[s] = Path("/proc/sys", s).read_text()
        except OSError:
            pass
    return {"mounts": mounts, "cgroups": cgroups, "sysctls": sysctls}


def assert_host_unchanged(before: dict, after: dict) -> None:
    assert after["sysctls"] == before["sysctls"]
    assert after["cgroups"] == before["cgroups"], (after["cgroups"] ^ before["cgroups"])
    assert after["mounts"] == before["mounts"], (after["mounts"] ^ before["mounts"])


def mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(path)]


def render(units: Path, conf_dir: Path) -> Path:
    units.mkdir(parents=True, exist_ok=True)
    unit = units / install.UNIT_NAME
    unit.write_text(install.render_unit(BIN, str(conf_dir)))
    return unit


def verify(unit_dir: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                          capture_output=True, text=True, cwd=unit_dir,
                          env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:"))


# --- systemd-analyze verify -------------------------------------------------------------

@needs_systemd
def test_unit_verifies_clean(tmp_path):
    """The shipped template, rendered as install-systemd renders it, with a drop-in."""
    unit = render(tmp_path / "units", tmp_path / "etc")
    r = verify(tmp_path / "units", f"{tmp_path}/units/agentstatefs@default.service",
               f"{tmp_path}/units/agentstatefs@tenant-2.service")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # The template as shipped differs from the rendering in those two paths only.
    shipped = UNIT_FILE.read_text()
    assert unit.read_text() == shipped.replace(install.UNIT_BIN, BIN).replace(
        "EnvironmentFile=-/etc/agentstatefs/", f"EnvironmentFile=-{tmp_path}/etc/")
    # A credential drop-in (how the key is handed over) verifies too.
    dropin = tmp_path / "units" / "agentstatefs@default.service.d"
    dropin.mkdir()
    (dropin / "key.conf").write_text(f"[Service]\nLoadCredential=key:{tmp_path}/default.key\n")
    r = verify(tmp_path / "units", f"{tmp_path}/units/agentstatefs@default.service")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_shipped_unit_has_no_private_mount_namespace():
    """Settings that give the service its own mount namespace would hide the mount."""
    forbidden = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
                 "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
                 "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables", "ProtectKernelModules",
                 "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
                 "DynamicUser", "RootDirectory", "RootImage", "MountAPIVFS", "PrivateUsers",
                 "ProtectHostname", "NetworkNamespacePath", "PrivateNetwork", "LogNamespace")
    for line in UNIT_FILE.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        assert key not in forbidden, line


def test_install_systemd_into_a_root(tmp_path):
    root = tmp_path / "root"
    r = subprocess.run([BIN, "install-systemd", "--root", str(root), "--tenant", "default",
                        "--tenant", "t2", "--no-reload"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    unit = (root / "etc/systemd/system/agentstatefs@.service").read_text()
    assert f"ExecStart={BIN} mount --systemd" in unit
    assert "MOUNTPOINT=/mnt/agents\n" in (root / "etc/agentstatefs/default.conf").read_text()
    assert "MOUNTPOINT=/mnt/agents-t2\n" in (root / "etc/agentstatefs/t2.conf").read_text()
    assert os.readlink(root / "sbin/mount.fuse.agentstatefs") == HELPER
    assert (root / install.DOC_PATH.lstrip("/")).read_text() == (HERE.parent / "docs/operations.md").read_text()
    # Settings the admin edited are kept; the unit is refreshed (an upgrade).
    (root / "etc/agentstatefs/t2.conf").write_text("MOUNTPOINT=/srv/t2\n")
    r = subprocess.run([BIN, "install-systemd", "--root", str(root), "--tenant", "t2", "--no-reload"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "kept" in r.stdout
    assert (root / "etc/agentstatefs/t2.conf").read_text() == "MOUNTPOINT=/srv/t2\n"
    # Bad input: a clear message, exit 2, nothing written.
    for bad in (["--tenant", "../x"], ["--tenant", "a", "-o", "nonsense"],
                ["--tenant", "a", "--mountpoint", "relative/path"]):
        r = subprocess.run([BIN, "install-systemd", "--root", str(tmp_path / "bad"), "--no-reload", *bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("agentstatefs: "), (bad, r.stderr)
        assert not (tmp_path / "bad").exists()


# --- a real systemd -----------------------------------------------------------------------

@pytest.fixture
def host_snapshot(tmp_path_factory):
    """Snapshot the host before the test and compare after its own teardown."""
    root = str(tmp_path_factory.getbasetemp().parent)
    before = host_state(root)
    yield
    assert_host_unchanged(before, host_state(root))
    assert not os.path.ismount("/mnt/agents") or "/mnt/agents" in {m[0] for m in before["mounts"]}


@pytest.fixture
def sd(tmp_path, host_snapshot):
    """A systemd whose unit path holds the rendered template (and stub base units)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    varlib, nsmnt = tmp_path / "var-lib", tmp_path / "ns-mnt"
    varlib.mkdir()
    nsmnt.mkdir()
    render(tmp_path / "units", conf_dir)
    subprocess.run(["mount", "--bind", shared, shared], check=True)
    ns = None
    try:
        subprocess.run(["mount", "--make-shared", shared], check=True)
        ns = SystemdNS([str(tmp_path / "units"), str(HERE / "systemd-base-units")], str(shared),
                       str(tmp_path / "pid1.log"), binds=[(varlib, "/var/lib"), (nsmnt, "/mnt")])
        ns.start()
        yield ns, tmp_path
    finally:
        try:
            if ns is not None and getattr(ns, "pid1", None):
                ns.stop()
            elif ns is not None and getattr(ns, "proc", None):
                ns.proc.kill()
                ns.proc.wait(10)
        finally:
            subprocess.run(["umount", "-R", "-l", shared])
            log = tmp_path / "pid1.log"
            if log.exists():
                print(log.read_text(errors="replace")[-4000:])
        assert mounts_under(str(tmp_path)) == []
        assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_our_daemon(p, tmp_path)]


def _is_our_daemon(pid: str, tmp_path: Path) -> bool:
    try:
        return str(tmp_path) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def read(p) -> str:
    with open(p) as f:
        return f.read()


def answers(mp: Path, agent: str, expect: dict) -> bool:
    try:
        return os.path.ismount(mp) and json.loads(read(mp / agent / "config.json")) == expect
    except OSError:
        return False


@needs_root
@needs_systemd
def test_two_tenants_under_real_systemd(sd):
    ns, tmp = sd
    shared = tmp / "shared"
    mp = {t: shared / t for t in ("alpha", "beta")}
    (tmp / "etc/alpha.conf").write_text(f"MOUNTPOINT={mp['alpha']}\nOPTIONS=history=visible\n")
    (tmp / "etc/beta.conf").write_text(f"MOUNTPOINT={mp['beta']}\nOPTIONS=allow_other\nDAEMON_ARGS=\n")
    # alpha gets its encryption key as a credential (64 random bytes, as hex).
    alpha_key = os.urandom(64).hex()
    (tmp / "alpha.key").write_text(alpha_key + "\n")
    os.chmod(tmp / "alpha.key", 0o600)
    dropin = tmp / "units/agentstatefs@alpha.service.d"
    dropin.mkdir()
    (dropin / "key.conf").write_text(f"[Service]\nLoadCredential=key:{tmp}/alpha.key\n")
    ns.systemctl("daemon-reload")
    units = [f"agentstatefs@{t}.service" for t in mp]
    timings = {"systemd_up_s": round(ns.startup_s, 3)}

    # -- start both at once: systemctl returns when both have sent READY=1 -----------------
    t0 = time.monotonic()
    r = ns.systemctl("start", *units, check=False)
    timings["start_two_tenants_to_ready_s"] = round(time.monotonic() - t0, 3)
    assert r.returncode == 0, (r.stderr, ns.systemctl("status", *units, check=False).stdout)
    pids = {}
    for t, unit in zip(mp, units):
        assert ns.prop(unit, "ActiveState") == "active"
        assert ns.prop(unit, "StatusText").startswith(f"serving {mp[t]}")
        assert ns.prop(unit, "WatchdogUSec") == "30s"
        # The mount answers the host right away (READY=1 means it does), and the daemon
        # shares systemd's mount namespace: the hardening creates no private one.
        assert os.path.ismount(mp[t])
        os.statvfs(mp[t])
        pids[t], = ns.host_pids(unit)
        assert os.readlink(f"/proc/{pids[t]}/ns/mnt") == os.readlink(f"/proc/{ns.pid1}/ns/mnt")
        status = Path(f"/proc/{pids[t]}/status").read_text()
        assert "NoNewPrivs:\t1" in status

    # The credential reached alpha only, as a file, not in its environment or command line.
    env = {k: v for k, _, v in (e.partition("=") for e in
                                Path(f"/proc/{pids['alpha']}/environ").read_text().split("\0"))}
    cred_dir = env["CREDENTIALS_DIRECTORY"]
    # (read through the daemon's own view of the file system: /proc/PID/root)
    r = ns.run("cat", f"{cred_dir}/key", check=False)
    assert Path(f"/proc/{pids['alpha']}/root{cred_dir}/key").read_text() == alpha_key + "\n", r.stderr
    assert alpha_key not in Path(f"/proc/{pids['alpha']}/environ").read_text()
    assert "CREDENTIALS_DIRECTORY=" not in Path(f"/proc/{pids['beta']}/environ").read_text()

    # -- write through both mounts from the host -------------------------------------------
    for t in mp:
        os.mkdir(mp[t] / f"agent-{t}")
        (mp[t] / f"agent-{t}/config.json").write_text(json.dumps({"tenant": t, "v": 1}))
        (mp[t] / f"agent-{t}/memory.json").write_text(json.dumps({"facts": [t]}))
        assert answers(mp[t], f"agent-{t}", {"tenant": t, "v": 1})
    assert "@history" in os.listdir(mp["alpha"] / "agent-alpha")  # OPTIONS reached alpha only
    assert "@history" not in os.listdir(mp["beta"] / "agent-beta")
    assert not (mp["alpha"] / "agent-beta").exists() and not (mp["beta"] / "agent-alpha").exists()

    # -- kill -9 alpha's daemon: systemd brings the mount back, with its data ----------------
    t0 = time.monotonic()
    os.kill(pids["alpha"], signal.SIGKILL)
    wait_for(lambda: ns.prop(units[0], "NRestarts") == "1"
             and ns.prop(units[0], "ActiveState") == "active"
             and answers(mp["alpha"], "agent-alpha", {"tenant": "alpha", "v": 1}),
             what="alpha to come back after kill -9")
    timings["restart_after_kill9_s"] = round(time.monotonic() - t0, 3)
    new_pid, = ns.host_pids(units[0])
    assert new_pid != pids["alpha"]
    assert json.loads(read(mp["alpha"] / "agent-alpha/memory.json")) == {"facts": ["alpha"]}
    (mp["alpha"] / "agent-alpha/config.json").write_text(json.dumps({"tenant": "alpha", "v": 2}))
    # beta never noticed.
    assert ns.host_pids(units[1]) == [pids["beta"]] and ns.prop(units[1], "NRestarts") == "0"
    assert answers(mp["beta"], "agent-beta", {"tenant": "beta", "v": 1})
    journal = ns.run("journalctl", "--no-pager", "-o", "cat", "-u", units[0]).stdout
    warnings = ns.run("journalctl", "--no-pager", "-o", "cat", "-p", "warning", "-u", units[0]).stdout
    assert "stale FUSE mount" in warnings, journal       # ExecStartPre=- clean-mount, priority 4
    assert "clean-mount: detached the dead mount" in journal, journal
    assert "ready: serving" in journal and "<6>" not in journal  # priorities parsed by journald

    # -- systemctl stop: both unmount cleanly -----------------------------------------------
    t0 = time.monotonic()
    ns.systemctl("stop", *units)
    timings["stop_two_tenants_s"] = round(time.monotonic() - t0, 3)
    for t, unit in zip(mp, units):
        assert not os.path.ismount(mp[t])
        assert ns.prop(unit, "Result") == "success"
        assert ns.prop(unit, "ActiveState") == "inactive"
        assert mounts_under(str(mp[t])) == []
    # The data is in each tenant's StateDirectory repository (git, readable with git).
    for t, want in (("alpha", 2), ("beta", 1)):
        repo = tmp / "var-lib/agentstatefs" / t
        assert oct(repo.stat().st_mode & 0o777) == "0o700"
        log = subprocess.run(["git", "-C", str(repo), "log", "--format=%s", "main"],
                             capture_output=True, text=True, check=True).stdout
        assert f"agent-{t}/config.json" in log
        show = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "main"],
                              capture_output=True, text=True, check=True).stdout
        assert f"agent-{t}/config.json" in show
        assert not [x for x in show.split() if f"agent-{'beta' if t == 'alpha' else 'alpha'}" in x]
        fsck = subprocess.run(["git", "-C", str(repo), "fsck", "--full"], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stderr
        # alpha (with the credential 'key') is encrypted at rest, beta is not
        objects = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch-all-objects", "--batch"],
                                 capture_output=True, check=True).stdout
        assert (f'"tenant": "{t}"'.encode() in objects) == (t == "beta")
    assert (tmp / "var-lib/agentstatefs/alpha/agentstatefs/encryption.json").exists()
    stop_log = ns.run("journalctl", "--no-pager", "-o", "cat", "-u", units[1]).stdout
    assert "received SIGTERM" in stop_log and "unmounted" in stop_log, stop_log

    # -- tenant "default" with no settings file: the documented defaults ---------------------
    # (plus a drop-in with a short watchdog, to see it work end to end)
    assert not (tmp / "etc/default.conf").exists()
    dunit = "agentstatefs@default.service"
    dropin = tmp / f"units/{dunit}.d"
    dropin.mkdir()
    (dropin / "watchdog.conf").write_text("[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n")
    ns.systemctl("daemon-reload")
    ns.systemctl("start", dunit)
    assert ns.run("mountpoint", "/mnt/agents").returncode == 0
    ns.run("mkdir", "/mnt/agents/d1")
    assert ns.run("ls", "/mnt/agents").stdout.split() == ["d1"]
    assert ns.prop(dunit, "StatusText").startswith("serving /mnt/agents")
    # STATUS follows the store (refreshed with each ping) ...
    wait_for(lambda: ns.prop(dunit, "StatusText").startswith("serving /mnt/agents, 1 agents, 1 commits"),
             what="STATUS to show the new agent")
    # ... pings arrive (the watchdog timestamp moves on) ...
    first = int(ns.prop(dunit, "WatchdogTimestampMonotonic"))
    wait_for(lambda: int(ns.prop(dunit, "WatchdogTimestampMonotonic")) > first, what="a watchdog ping")
    # ... and a daemon that stops answering is killed and replaced by systemd.
    pid, = ns.host_pids(dunit)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: ns.prop(dunit, "NRestarts") == "1" and ns.prop(dunit, "ActiveState") == "active",
                 what="the watchdog to restart a frozen daemon")
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)
    timings["watchdog_restart_of_frozen_daemon_s"] = round(time.monotonic() - t0, 3)
    assert ns.host_pids(dunit) != [pid]
    assert ns.run("ls", "/mnt/agents").stdout.split() == ["d1"]
    ns.systemctl("stop", dunit)
    assert ns.prop(dunit, "Result") == "success"
    assert ns.run("mountpoint", "/mnt/agents", check=False).returncode != 0
    assert (tmp / "var-lib/agentstatefs/default/HEAD").exists() or \
        (tmp / "var-lib/agentstatefs/default").is_dir()
    print("TIMINGS", json.dumps(timings))
    (tmp / "timings.json").write_text(json.dumps(timings))


@needs_root
@needs_systemd
def test_mount_unit_with_fuse_helper(sd, fstab_helper):
    """A .mount unit (what an /etc/fstab line becomes) of type fuse.agentstatefs."""
    ns, tmp = sd
    where = tmp / "shared" / "fstab"
    repo = tmp / "fstab-repo"
    name = subprocess.run(["systemd-escape", "-p", "--suffix=mount", str(where)],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp / "units" / name).write_text(
        "[Unit]\nDescription=agentstatefs via mount(8)\n\n"
        f"[Mount]\nWhat={repo}\nWhere={where}\nType=fuse.agentstatefs\n"
        "Options=allow_other,history=visible,nofail,noatime\n")
    ns.systemctl("daemon-reload")
    ns.systemctl("start", name)
    assert ns.prop(name, "ActiveState") == "active"
    assert os.path.ismount(where)
    os.mkdir(where / "a1")
    (where / "a1/config.json").write_text('{"via": "mount unit"}')
    assert "@history" in os.listdir(where / "a1")
    ns.systemctl("stop", name)
    assert not os.path.ismount(where)
    assert ns.prop(name, "Result") == "success"
    # the daemon finished and exited (no process of ours is left in the namespace)
    wait_for(lambda: not ns.host_pids(name), what="daemon exit")
    log = subprocess.run(["git", "-C", str(repo), "log", "--format=%s", "main"],
                         capture_output=True, text=True, check=True).stdout
    assert "a1/config.json" in log


# --- mount(8) and the helper, no systemd -----------------------------------------------------

@pytest.fixture
def fstab_helper():
    """/sbin/mount.fuse.agentstatefs for the test's duration (mount(8) only looks in /sbin)."""
    link = Path("/sbin") / install.HELPER_NAME
    if link.exists() or link.is_symlink():
        if os.path.realpath(link) != os.path.realpath(HELPER):
            pytest.skip(f"{link} exists and is not this checkout's helper")
        yield link
        return
    if os.geteuid() != 0:
        pytest.skip("needs root")
    link.symlink_to(HELPER)
    try:
        yield link
    finally:
        link.unlink()


def _cleanup_mount(mp: Path):
    if os.path.ismount(mp) or mounts_under(str(mp)):
        subprocess.run([BIN, "umount", str(mp)], capture_output=True)
    if mounts_under(str(mp)):
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)


def test_mount_8_with_fuse_helper(tmp_path, fstab_helper):
    repo, mp = tmp_path / "repo", tmp_path / "mnt"
    mp.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "fuse.agentstatefs", "-o",
                            "allow_other,noauto,nofail,_netdev,noatime,x-systemd.after=x.service,"
                            "history=visible,comment=hi", str(repo), str(mp)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mp)  # mount(8) returned after the mount answers
        os.mkdir(mp / "a1")
        (mp / "a1/config.json").write_text('{"via": "fstab"}')
        assert "@history" in os.listdir(mp / "a1")
        info = [ln for ln in read("/proc/self/mountinfo").splitlines() if f" {mp} " in ln]
        assert "fuse.agentstatefs" in info[0] and f"agentstatefs:{repo}" in info[0]
        pid = int(os.getxattr(mp, "user.agentstatefs.pid"))
        assert Path(f"/proc/{pid}").exists()
        r = subprocess.run(["umount", str(mp)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                 read(f"/proc/{pid}/stat").split(") ")[-1].startswith("Z"), what="daemon exit")
        assert "write a1/config.json" in subprocess.run(
            ["git", "-C", str(repo), "log", "--format=%s", "main"], capture_output=True, text=True).stdout
        # A bad option: mount(8) fails with the daemon's reason, nothing is mounted.
        r = subprocess.run(["mount", "-t", "fuse.agentstatefs", "-o", "bogus=1", str(repo), str(mp)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "unknown mount option 'bogus'" in r.stderr
        assert not os.path.ismount(mp)
    finally:
        _cleanup_mount(mp)


def test_helper_option_filter():
    from agentstatefs.daemon.fstab import filter_options
    assert filter_options("ro,noatime,noexec,nosuid,nodev,allow_other,history=visible,nofail,"
                          "_netdev,user,x-systemd.automount,comment=x,defaults") == \
        "ro,allow_other,history=visible"


def test_clean_mount_leaves_live_mounts_alone(mounts):
    m = mounts().start()
    os.mkdir(m / "a1")
    r = subprocess.run([BIN, "clean-mount", str(m.mp)], capture_output=True, text=True)
    assert r.returncode == 0 and os.path.ismount(m.mp) and (m / "a1").is_dir()
    m.kill9()
    with pytest.raises(OSError):
        os.statvfs(m.mp)  # stale: "Transport endpoint is not connected"
    r = subprocess.run([BIN, "clean-mount", str(m.mp)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "detached the dead mount" in r.stderr
    assert not os.path.ismount(m.mp)
    os.statvfs(m.mp)
    assert subprocess.run([BIN, "clean-mount", str(m.mp / "nope")]).returncode == 0


def test_read_credential(tmp_path, monkeypatch):
    from agentstatefs.daemon.credentials import CredentialError, read_credential
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_credential("key") is None  # not under systemd, or no LoadCredential=
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_credential("key") is None  # other credentials, not this one
    (tmp_path / "key").write_bytes(b"\x00secret\n")
    assert read_credential("key") == b"\x00secret\n"
    (tmp_path / "big").write_bytes(b"x" * 100)
    with pytest.raises(CredentialError, match="larger than 10 bytes"):
        read_credential("big", max_size=10)
    for bad in ("", "../key", "."):
        with pytest.raises(CredentialError, match="bad credential name"):
            read_credential(bad)
