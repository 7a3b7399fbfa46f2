"""Every command in README.md and docs/restore.md, run exactly as printed.

The code blocks are parsed out of the markdown files here, so the docs and this test
cannot drift: a changed or new command line is run as it now reads, and must succeed
(or fail exactly where the docs say it fails). The commands use the real default paths
(`/mnt/agents`, `/var/lib/agentstatefs/default`), so they run in a private mount
namespace (`unshare -m`) where a tmpfs covers /mnt and a temp directory covers
/var/lib/agentstatefs: the host's are never touched. The repository there starts with
a history made on the morning of 2026-11-25 (the dates restore.md uses), written through
the store with those commit times.

The one command not run here is the README's test command: it is what runs this test
(`.ci/run` is checked to be exactly that line).
"""

import json
import os
import re
import signal
import subprocess
import sys
from calendar import timegm
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/restore.md")
TEST_COMMAND = "bash .ci/setup && .venv/bin/pytest -rs tests"

# Commands the docs say fail: line -> exit status they document.
EXPECTED_STATUS = {
    "echo '{oops' | agentstatefs put planner config.json   # exits 1 with the reason": 1,
}


def code_lines(path: Path) -> list[str]:
    """The command lines of a markdown file's code blocks (4-space indented blocks after
    a blank line or a heading, and fenced blocks), without their indentation; lines that are only a
    comment continue the previous command's comment and are kept (bash ignores them)."""
    lines = path.read_text().splitlines()
    out, fenced, in_block, prev_blank = [], False, False, True
    for line in lines:
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append(line)
            continue
        if line.startswith("    ") and (in_block or prev_blank):
            in_block = True
            out.append(line[4:])
        elif line.strip():
            in_block = False
        # an indented block may follow a blank line or a heading (not a paragraph line)
        prev_blank = not line.strip() or line.startswith("#")
    return [x for x in out if x.strip() and not x.lstrip().startswith("#")]


def _t(text: str) -> int:
    return timegm(tuple(map(int, re.split(r"[-T:Z]", text)[:6])) + (0, 0, 0))


def make_history(repo: Path) -> None:
    """a1 with six config versions and a memory, a2, all between 08:00 and 09:50 UTC."""
    from agentstatefs.fs.changes import MKDIR, WRITE, Change, Who
    from agentstatefs.fs.store import Store
    store = Store(str(repo))
    who = Who(0, 0, 1, "setup")
    ns = lambda text: _t(text) * 10**9  # noqa: E731
    changes = [Change(MKDIR, "a1", who, ns("2026-11-25T08:00:00Z"),
                      attrs={"": {"mode": 0o755, "uid": 0, "gid": 0}}),
               Change(MKDIR, "a2", who, ns("2026-11-25T08:05:00Z"),
                      attrs={"": {"mode": 0o755, "uid": 0, "gid": 0}}),
               Change(WRITE, "a1", who, ns("2026-11-25T08:20:00Z"), files={"memory.json": b'{"facts": []}'})]
    for v in range(1, 7):
        changes.append(Change(WRITE, "a1", who, ns(f"2026-11-25T08:{10 + v * 7:02d}:00Z"),
                              files={"config.json": json.dumps({"v": v}).encode()}))
    changes.append(Change(WRITE, "a2", who, ns("2026-11-25T09:50:00Z"), files={"config.json": b'{"a2": 1}'}))
    changes.sort(key=lambda c: c.time_ns)
    for c in changes:
        assert not isinstance(store.commit_batch([c])[0], Exception)
    store.close()


def test_readme_test_command_is_what_ci_runs():
    assert TEST_COMMAND in code_lines(ROOT / "README.md")
    assert TEST_COMMAND in (ROOT / ".ci/run").read_text().splitlines()


def test_every_documented_command_runs_as_printed(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the documented commands are for root (README: 'as root')")
    t = tmp_path
    varlib = t / "varlib"
    (varlib / "default").mkdir(parents=True)
    make_history(varlib / "default")
    before = subprocess.run(["git", "-C", str(varlib / "default"), "log", "--format=%H %s"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    a1_commits = [line.split()[0] for line in before if " a1/" in line or line.endswith("mkdir a1/")]
    created_varlib = not os.path.exists("/var/lib/agentstatefs")
    os.makedirs("/var/lib/agentstatefs", exist_ok=True)   # the bind mount needs a mount point

    # Steps: (where from, command). Test-only steps are marked "prep".
    steps: list[tuple[str, str]] = []
    docs = {name: code_lines(ROOT / name) for name in DOCS}
    for line in docs["README.md"]:
        if line == TEST_COMMAND:
            continue                       # what runs this test (see above)
        steps.append(("README.md", line))
        if line.endswith("agentstatefs mount"):
            steps.append(("prep", f"getfattr --only-values -n user.agentstatefs.pid /mnt/agents > {t}/daemon.pid"))
    steps.append(("prep", "kill $(jobs -p) 2>/dev/null; wait"))   # the watch job, if still there
    for line in docs["docs/restore.md"]:
        if "2026-11-25T09:00:00Z/" in line and not any("rm -r /mnt/agents/a1" in s for _, s in steps):
            steps.append(("prep", "rm -r /mnt/agents/a1"))       # "a deleted agent"
        steps.append(("docs/restore.md", line))

    script = [
        "set -u",
        f"exec 3>{t}/status",
        "mount -t tmpfs -o mode=755 agentstatefs-docs-test /mnt",
        f"mount --bind {varlib} /var/lib/agentstatefs",
        f"export PATH={ROOT}/.venv/bin:$PATH",
        f"cd {ROOT}",
        f"trap 'cd /; agentstatefs umount /mnt/agents > {t}/umount.out 2>&1; echo umount $? >&3' EXIT",
    ]
    for k, (_, line) in enumerate(steps):
        script += ["{ " + line, f"}} > {t}/out.{k} 2> {t}/err.{k} < /dev/null", f"echo {k} $? >&3"]
    (t / "script.sh").write_text("\n".join(script) + "\n")
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", str(t / "script.sh")],
                           capture_output=True, text=True, timeout=900)
    finally:
        try:
            pid = int((t / "daemon.pid").read_text())
            os.kill(pid, signal.SIGKILL)        # only if the umount above did not end it
        except (OSError, ValueError):
            pass
        if created_varlib:
            try:
                os.rmdir("/var/lib/agentstatefs")
            except OSError:
                pass

    status = {}
    for line in (t / "status").read_text().splitlines():
        k, rc = line.split()
        status[k] = int(rc)
    out = lambda k: (t / f"out.{k}").read_text(errors="replace")  # noqa: E731
    err = lambda k: (t / f"err.{k}").read_text(errors="replace")  # noqa: E731
    failures = []
    for k, (src, line) in enumerate(steps):
        want = EXPECTED_STATUS.get(line, 0)
        got = status.get(str(k))
        if got != want:
            failures.append(f"{src}: {line!r} exited {got}, expected {want}:\n{err(k) if got is not None else r.stderr}")
    assert not failures, "\n".join(failures)
    assert status.get("umount") == 0, (t / "umount.out").read_text()
    assert set(EXPECTED_STATUS) <= {line for _, line in steps}, "EXPECTED_STATUS names a line no longer in the docs"

    # What the commands showed is what the docs say they show.
    idx = {line: k for k, (_, line) in enumerate(steps)}

    def output_of(prefix: str, nth: int = 0) -> str:
        ks = [k for k, (_, line) in enumerate(steps) if line.startswith(prefix)]
        return out(ks[nth])

    assert json.loads(output_of("cat planner/config.json", 0)) == {"model": "small", "temp": 0.2}
    assert json.loads(output_of("cat planner/config.json", 1)) == {"model": "small", "temp": 0.9}
    assert output_of("cat planner/@rejected/config.json") == "{oops\n"
    assert "Expecting" in output_of("getfattr -n user.agentstatefs.last-error")
    assert "Expecting" in err(idx["echo '{oops' | agentstatefs put planner config.json   # exits 1 with the reason"])
    git_log = output_of("git -C /var/lib/agentstatefs/default log --stat")
    assert "write planner/config.json" in git_log and "mkdir a1" in git_log
    # ls -t lists a1's commits newest first (a1 changed in 8 commits before the restores)
    a1 = output_of("ls -t /mnt/agents/a1/@history").split()
    assert a1 == a1_commits and len(a1) == 8
    everything = output_of("ls -t /mnt/agents/@history | head").split()
    assert len(everything) == 10 and a1[0] in everything
    log_a1 = output_of("agentstatefs log a1 config.json").splitlines()
    assert len(log_a1) == 6 and "write a1/config.json" in log_a1[0] and log_a1[0].startswith(a1[0][:10])
    diff = output_of("agentstatefs diff HEAD~5 HEAD a1")
    assert '-{"v": 1}' in diff and '+{"v": 6}' in diff
    assert json.loads(output_of("cat /mnt/agents/@history/2026-11-25T10:00:00Z/a1/config.json")) == {"v": 6}
    assert json.loads(output_of("cat /mnt/agents/a1/@history/2026-11-25/config.json")) == {"v": 6}
    assert json.loads(output_of("cat /mnt/agents/a1/@history/HEAD~1/config.json")) == {"v": 5}
    assert 'user.agentstatefs.version="5"' in output_of("getfattr -d /mnt/agents/a1/@history/HEAD~1/config.json")
    env = json.loads(output_of("agentstatefs show HEAD~1 a1/config.json --envelope"))
    assert env["agent_id"] == "a1" and env["version"] == 5 and env["data"] == {"v": 5}
    assert "restored a1/config.json from" in output_of("agentstatefs restore a1 config.json HEAD~1")
    assert output_of("ls /mnt/agents/@history/2026-11-25T09:00:00Z/").split() == ["a1", "a2"]

    # The repository afterwards: the restores are labelled, and a1 is back as it was at 09:00.
    repo = varlib / "default"
    subjects = subprocess.run(["git", "-C", str(repo), "log", "--format=%s"], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    restores = [s for s in subjects if s.startswith("restore ")]
    assert len(restores) == 4, subjects      # cp, restore verb, cp -r (config and memory)
    assert subprocess.run(["git", "-C", str(repo), "fsck", "--full"], capture_output=True).returncode == 0
    assert sys.executable   # (the daemon ran from this tree's .venv)
