"""``agentstatefs status [MOUNTPOINT] [--repo DIR] [--json]``: one screen about a tenant.

Mounted: everything comes from the mount's files (``M/@stats`` and the root xattrs),
as any script could read them. Not mounted: the repository is read directly,
read-only (``fs/repostats.py``): size, head, commits, agents, last checkpoint, and a
warning when the journal holds changes the next mount will replay.
"""

from __future__ import annotations

import json
import os
import sys
import time

from ..fs.errors import RepoError
from .options import DEFAULT_MOUNTPOINT, DEFAULT_REPO_ROOT, DEFAULT_TENANT

PID_XATTR = "user.agentstatefs.pid"


def _is_mount(mp: str) -> bool:
    try:
        os.getxattr(mp, PID_XATTR)
        return True
    except OSError:
        return False


def _xattr(mp: str, name: str) -> str | None:
    try:
        return os.getxattr(mp, name).decode("utf-8", "replace") or None
    except OSError:
        return None


def mounted_status(mp: str) -> dict:
    with open(os.path.join(mp, "@stats"), "rb") as f:
        doc = json.loads(f.read())
    info, m = doc.get("info", {}), doc.get("metrics", {})

    def hist(name):
        h = m.get(name) or {}
        return {k: h.get(k) for k in ("count", "p50", "p99")} if h else None

    return {
        "mounted": True,
        "mountpoint": mp,
        "tenant": info.get("tenant"),
        "repo": _xattr(mp, "user.agentstatefs.repo") or info.get("repo"),
        "pid": info.get("pid"),
        "started": info.get("started"),
        "uptime_seconds": doc.get("uptime_seconds"),
        "readonly": info.get("readonly"),
        "head": _xattr(mp, "user.agentstatefs.head") or info.get("head"),
        "git_head": _xattr(mp, "user.agentstatefs.git-head") or info.get("git_head"),
        "agents": info.get("agents"),
        "commits": info.get("commits"),
        "repo_size_bytes": info.get("repo_size_bytes"),
        "last_checkpoint": info.get("last_checkpoint"),
        "journal_bytes": m.get("journal_bytes"),
        "scratch_bytes": m.get("scratch_bytes"),
        "scratch_max_bytes": m.get("scratch_max_bytes"),
        "runtime_bytes": m.get("runtime_bytes"),
        "open_handles": m.get("open_handles"),
        "commits_since_mount": m.get("commits_total"),
        "commit_seconds": hist("commit_duration_seconds"),
        "fsync_seconds": hist("journal_fsync_seconds"),
        "replication": {
            "enabled": bool(m.get("replication_enabled")) or bool(info.get("replication")),
            "detail": info.get("replication"),
            "lag_seconds": m.get("replication_lag_seconds"),
            "lag_commits": m.get("replication_lag_commits"),
            "errors": m.get("replication_errors_total"),
            "last_push": m.get("replication_last_push_timestamp_seconds") or None,
        },
        "maintenance": info.get("maintenance"),
        "warnings": list(info.get("warnings") or []),
    }


def unmounted_status(repo: str) -> dict:
    from ..fs import repostats
    s = repostats.scan(repo)
    warnings = []
    if s["journal_records"]:
        warnings.append(f"journal holds {s['journal_records']} change(s) after the last checkpoint "
                        "(replayed at the next mount)")
    cp = s.get("checkpoint") or {}
    return {
        "mounted": False,
        "mountpoint": None,
        "tenant": os.path.basename(os.path.abspath(repo).rstrip("/")),
        "repo": os.path.abspath(repo),
        "head": s["head"],
        "agents": s["agents"],
        "commits": s["commits"],
        "repo_size_bytes": s["size_bytes"],
        "last_checkpoint": cp.get("time"),
        "journal_records": s["journal_records"],
        "replication": None,
        "warnings": warnings,
    }


def _size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ago(t) -> str:
    if not t:
        return "never"
    d = max(0.0, time.time() - t)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    if d < 120:
        return f"{when} ({d:.0f} s ago)"
    if d < 7200:
        return f"{when} ({d / 60:.0f} min ago)"
    return f"{when} ({d / 3600:.1f} h ago)"


def human(st: dict) -> str:
    rows = [("tenant", st["tenant"] or "?")]
    if st["mounted"]:
        rows.append(("mount", f"{st['mountpoint']} (daemon pid {st['pid']}, up "
                              f"{(st.get('uptime_seconds') or 0) / 60:.0f} min"
                              f"{', read-only' if st.get('readonly') else ''})"))
    else:
        rows.append(("mount", "not mounted"))
    rows.append(("repo", f"{st['repo']} ({_size(st['repo_size_bytes'])})"))
    rows.append(("head", st["head"] or "(no commits)"))
    rows.append(("agents", "?" if st["agents"] is None else str(st["agents"])))
    rows.append(("commits", str(st["commits"])))
    rows.append(("checkpoint", _ago(st["last_checkpoint"])))
    if st["mounted"]:
        if st.get("scratch_max_bytes"):
            rows.append(("scratch", f"{_size(st['scratch_bytes'])} of {_size(st['scratch_max_bytes'])}"))
        rows.append(("runtime", _size(st.get("runtime_bytes"))))
        c = st.get("commit_seconds")
        if c and c.get("count"):
            rows.append(("commit", f"p50 {c['p50'] * 1e3:.1f} ms, p99 {c['p99'] * 1e3:.1f} ms "
                                   f"over {c['count']} groups"))
    mt = st.get("maintenance")
    if mt and mt.get("kind"):
        prog = f" {mt['done']}/{mt['total']}" if mt.get("total") else ""
        extra = f": {mt['error']}" if mt.get("error") else ""
        rows.append(("maintenance", f"{mt['kind']} {mt['state']} ({mt['phase']}{prog}){extra}"))
    r = st.get("replication")
    if r is None:
        rows.append(("replication", "unknown (not mounted)"))
    elif not r["enabled"]:
        rows.append(("replication", "off"))
    elif (r.get("detail") or {}).get("mode") == "replica":
        d = r["detail"]
        rows.append(("replication", f"read-only replica of {d.get('url')}: last fetch {_ago(d.get('last_fetch'))}, "
                                    f"{d.get('errors') or 0} errors"))
    else:
        d = r.get("detail") or {}
        rows.append(("replication", f"pushing to {d.get('url') or '?'}: {r['lag_seconds'] or 0:.0f} s / "
                                    f"{r['lag_commits'] or 0} commits behind, {r['errors'] or 0} errors, "
                                    f"last push {_ago(r['last_push'])}"))
        if d.get("last_error"):
            rows.append(("", f"last error: {d['last_error']}"))
    rows.append(("warnings", "none" if not st["warnings"] else st["warnings"][0]))
    rows += [("", w) for w in st["warnings"][1:]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def cmd_status(args) -> int:
    mp = os.path.abspath(args.mountpoint) if args.mountpoint else None
    repo = args.repo
    if mp is None:
        if repo is not None:
            from .history_cli import _mounted_at
            at = _mounted_at(repo)
            if at and _is_mount(at):
                mp = at
        elif _is_mount(DEFAULT_MOUNTPOINT):
            mp = DEFAULT_MOUNTPOINT
    if mp is not None and not _is_mount(mp):
        if repo is None:
            print(f"agentstatefs: no agentstatefs mount at {mp} (give --repo DIR to read a repository "
                  "that is not mounted)", file=sys.stderr)
            return 1
        mp = None
    try:
        if mp is not None:
            st = mounted_status(mp)
        else:
            repo = repo or os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
            if not os.path.isdir(os.path.join(repo, "objects")):
                print(f"agentstatefs: {repo} is not an agentstatefs repository", file=sys.stderr)
                return 1
            from .history_cli import check_readable
            check_readable(repo)
            st = unmounted_status(repo)
    except (OSError, RepoError) as exc:
        print(f"agentstatefs: status: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"agentstatefs: status: unreadable @stats ({exc})", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(st, indent=1, sort_keys=True) + "\n")
    else:
        sys.stdout.write(human(st))
    return 0


def register(sub) -> None:
    p = sub.add_parser("status", help="summary of a mount or repository (--json for scripts)",
                       description="Tenant, repository, head, agents, commits, size, last checkpoint, "
                                   "replication and warnings. MOUNTPOINT mounted: read from its @stats and "
                                   "root xattrs. Otherwise --repo DIR is read directly (read-only).")
    p.add_argument("mountpoint", nargs="?", help=f"mount point (default {DEFAULT_MOUNTPOINT} if mounted)")
    p.add_argument("--repo", help="repository to read when it is not mounted (default: the default tenant's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
