"""History verbs: ``log``, ``diff``, ``show``, ``restore`` (mounted or unmounted repo).

Reads go straight to the repository (read-only while a daemon serves it). ``restore``
on a mounted repository copies the version out of the mount's ``@history`` onto the
state file (one commit through the daemon, which stays the only writer, labelled a
restore because this process read that version from ``@history``); on an unmounted one
it takes the repository lock and commits a RESTORE through the store.

Revisions given with an agent (``show REV AGENT/FILE``, ``diff REV1 REV2 AGENT[/FILE]``,
``restore ID FILE REV``) are in that agent's context, as in ``M/<id>/@history``:
``HEAD~1`` is the agent's previous version and a time picks the agent's last commit at
or before it. Commit ids and prefixes name any commit. A restore that would change
nothing exits 1 and says so.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import sys
import time
from contextlib import contextmanager

from ..fs import changes as ch
from ..fs import private
from ..fs.errors import FsError, RepoError
from ..fs.history import TIME_FORMS, iso
from ..fs.names import DURABLE_FILES, check_agent_id
from ..fs.repolock import RepoLock
from ..fs.store import Store
from .credentials import CredentialError, repository_key
from .options import DEFAULT_REPO_ROOT, DEFAULT_TENANT


def _mounted_at(repo: str) -> str | None:
    """The mount point of the daemon holding ``repo``'s lock, or None if none does."""
    lock = RepoLock(repo)
    try:
        lock.acquire("(cli)")
    except RepoError:
        try:
            text = open(lock.path).read()
        except OSError:
            return ""
        return text.split(" mounted at ", 1)[1].strip() if " mounted at " in text else ""
    except OSError:
        return None
    lock.release()
    return None


def check_readable(repo: str) -> None:
    """The repository is private to the daemon's user (0700): anyone else gets a clear
    message pointing at the mount, where history is served with permission checks
    (reading the repository directly would bypass them, docs/security.md)."""
    try:
        os.stat(os.path.join(repo, "objects"))
    except PermissionError:
        try:
            owner = os.stat(repo).st_uid
        except OSError:
            owner = None
        by = f" (uid {owner})" if owner is not None else ""
        raise RepoError(f"{repo} is private to the daemon's user{by}; as another user read history "
                        f"through the mount, where your permissions are checked: "
                        f"MOUNTPOINT/<id>/@history/<rev>/<file> or MOUNTPOINT/@history/<rev>/<id>/<file>") from None
    except OSError:
        pass


@contextmanager
def open_store(repo: str, write: bool = False, keyfile: str | None = None):
    """A Store for the CLI: recovering (and locked) when no daemon holds the repo.
    ``keyfile`` (or the systemd credential ``key``) opens an encrypted store."""
    private.restrict_umask()
    check_readable(repo)
    if not os.path.isdir(os.path.join(repo, "objects")):
        raise RepoError(f"{repo} is not an agentstatefs repository")
    try:
        key = repository_key(keyfile)
    except CredentialError as exc:
        raise RepoError(str(exc)) from None
    lock = RepoLock(repo)
    locked = False
    try:
        lock.acquire("(cli)")
        locked = True
    except (RepoError, OSError):
        if write:
            raise
    try:
        store = Store(repo, create=False, readonly=not locked, key=key)
    except BaseException:
        lock.release()
        raise
    try:
        yield store
    finally:
        if locked:
            store.close()
        lock.release()


def _split_path(path: str) -> tuple[str, str | None]:
    agent, _, name = path.strip("/").partition("/")
    check_agent_id(agent)
    if name and name not in DURABLE_FILES:
        raise FsError(2, f"{name}: only {', '.join(DURABLE_FILES)} are versioned")
    return agent, name or None


def cmd_log(args) -> int:
    with open_store(args.repo, keyfile=args.keyfile) as store:
        idx = store.history
        if args.agent:
            check_agent_id(args.agent)
            positions = idx.agent_positions(args.agent)
        else:
            positions = range(len(idx))
        shown = 0
        for pos in reversed(positions):
            e = idx.entries[pos]
            if args.file and not any(n == args.file for n, _ in e.files):
                continue
            c = store.git.repo[e.commit]
            print(f"{e.commit[:10]}  {iso(e.time)}  {c.author.name:<32}  {c.message.splitlines()[0]}")
            shown += 1
            if args.n and shown >= args.n:
                break
    return 0


def _resolve(store, rev: str, agent: str | None):
    """A revision, in ``agent``'s context when given (HEAD~N and times count its commits;
    commit ids and prefixes name any commit, as they mean the same state of the agent)."""
    idx = store.history
    if agent is not None:
        try:
            return idx.resolve(rev, agent)
        except FsError:
            if not (len(rev) >= 4 and all(c in "0123456789abcdef" for c in rev)):
                raise
    return idx.resolve(rev)


def _file_at(store, rev: str, agent: str, name: str) -> tuple[bytes | None, dict | None, str]:
    e = _resolve(store, rev, agent)
    view = store.git.agent_at(e.commit, agent)
    if view is None or name not in view.files:
        return None, None, e.commit
    return store.git.read_blob(view.files[name], agent, name), view.file_meta(name), e.commit


def cmd_show(args) -> int:
    agent, name = _split_path(args.path)
    if name is None:
        raise FsError(2, "show needs AGENT/FILE, e.g. a1/config.json")
    with open_store(args.repo, keyfile=args.keyfile) as store:
        data, fm, commit = _file_at(store, args.rev, agent, name)
        if data is None:
            raise FsError(2, f"{agent}/{name} does not exist at {commit[:10]}")
        if args.envelope:
            env = {"agent_id": agent, "state_type": name[:-5], "timestamp": iso(fm["mtime_ns"] / 1e9),
                   "version": fm["version"], "data": json.loads(data)}
            print(json.dumps(env, indent=2, ensure_ascii=False))
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
    return 0


def cmd_diff(args) -> int:
    with open_store(args.repo, keyfile=args.keyfile) as store:
        scope = _split_path(args.path)[0] if args.path else None
        c1, c2 = _resolve(store, args.rev1, scope).commit, _resolve(store, args.rev2, scope).commit
        if args.path:
            agent, name = _split_path(args.path)
            pairs = [(agent, n) for n in ([name] if name else DURABLE_FILES)]
        else:
            t1, t2 = store.git.tree_at(c1), store.git.tree_at(c2)
            seen = set()
            for patch in t1.diff_to_tree(t2):
                d = patch.delta
                for path in (d.old_file.path, d.new_file.path):
                    parts = path.split("/")
                    if len(parts) == 4 and parts[3] in DURABLE_FILES:
                        seen.add((parts[2], parts[3]))
            pairs = sorted(seen)
        for agent, name in pairs:
            a = _file_at(store, c1, agent, name)[0]
            b = _file_at(store, c2, agent, name)[0]
            if a == b:
                continue
            lines = difflib.unified_diff(
                (a or b"").decode("utf-8", "replace").splitlines(keepends=True),
                (b or b"").decode("utf-8", "replace").splitlines(keepends=True),
                fromfile=f"a/{agent}/{name}" if a is not None else "/dev/null",
                tofile=f"b/{agent}/{name}" if b is not None else "/dev/null")
            for line in lines:
                sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return 0


def cmd_restore(args) -> int:
    agent = check_agent_id(args.agent)
    if args.file not in DURABLE_FILES:
        raise FsError(2, f"{args.file}: only {', '.join(DURABLE_FILES)} can be restored")
    mountpoint = _mounted_at(args.repo)
    if mountpoint:
        return _restore_mounted(args, agent, mountpoint)
    if mountpoint is not None:
        raise RepoError(f"{args.repo} is in use but its mount point is unknown; restore with cp from @history")
    with open_store(args.repo, write=True, keyfile=args.keyfile) as store:
        data, fm, commit = _file_at(store, args.rev, agent, args.file)
        if data is None:
            raise FsError(2, f"{agent}/{args.file} does not exist at {commit[:10]} ({args.rev})")
        who = ch.Who.from_pid(os.getuid(), os.getgid(), os.getpid())
        todo = []
        if store.git.agent(agent) is None:
            m = store.git.agent_at(commit, agent).meta
            todo.append(ch.Change(ch.MKDIR, agent, who, time.time_ns(),
                                  attrs={"": {k: m[k] for k in ("mode", "uid", "gid", "acl", "default_acl")
                                              if k in m}}))
        attrs = {args.file: {k: fm.get(k) for k in ("mode", "uid", "gid", "acl")}}
        todo.append(ch.Change(ch.RESTORE, agent, who, time.time_ns(), files={args.file: data},
                              attrs=attrs, note=commit[:7]))
        results = store.commit_batch(todo)
        for r in results:
            if isinstance(r, FsError):
                raise r
        if results[-1] is None:
            return _unchanged(agent, args.file, commit, fm)
        print(f"restored {agent}/{args.file} from {commit[:10]} (version {fm['version']} of {iso(fm['mtime_ns'] / 1e9)})")
        return 0


def _unchanged(agent: str, name: str, commit: str, fm: dict | None) -> int:
    what = f"version {fm['version']}, " if fm else ""
    print(f"agentstatefs: nothing to restore: {agent}/{name} already has the content of "
          f"{commit[:10]} ({what}no new commit)", file=sys.stderr)
    return 1


def _restore_mounted(args, agent: str, mp: str) -> int:
    """Copy the version out of the mount's @history onto the state file: one commit
    through the daemon, labelled a restore (this process read it from @history)."""
    target = os.path.join(mp, agent, args.file)
    if os.path.isdir(os.path.join(mp, agent)):
        src = os.path.join(mp, agent, "@history", args.rev, args.file)
    else:
        # A deleted agent: its own @history is gone with it; resolve its revision here.
        with open_store(args.repo, keyfile=args.keyfile) as store:
            commit = _resolve(store, args.rev, agent).commit
        src = os.path.join(mp, "@history", commit, agent, args.file)
    try:
        with open(src, "rb") as f:
            data = f.read()
        commit = os.getxattr(src, "user.agentstatefs.commit").decode()
        version = os.getxattr(src, "user.agentstatefs.version").decode()
    except FileNotFoundError:
        # Why: the revision (the daemon answers ENOENT only), or the file at it.
        with open_store(args.repo, keyfile=args.keyfile) as store:
            commit = _resolve(store, args.rev, agent).commit
        raise FsError(2, f"{agent}/{args.file} does not exist at {commit[:10]} ({args.rev})") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            with open_store(args.repo, keyfile=args.keyfile) as store:
                _resolve(store, args.rev, agent)   # ambiguous prefix: the store says which
        raise
    try:
        with open(target, "rb") as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if current == data:
        return _unchanged(agent, args.file, commit, {"version": version})
    os.makedirs(os.path.join(mp, agent), exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)
    print(f"restored {agent}/{args.file} from {commit[:10]} (version {version}, through {mp})")
    return 0


def _run(fn):
    def wrapped(args):
        try:
            return fn(args)
        except (FsError, RepoError) as exc:
            print(f"agentstatefs: {getattr(exc, 'reason', exc)}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # reader went away (| head)
            return 0
        except OSError as exc:
            print(f"agentstatefs: {exc}", file=sys.stderr)
            return 1
    return wrapped


def register(sub) -> None:
    default_repo = os.path.join(DEFAULT_REPO_ROOT, DEFAULT_TENANT)
    rev_help = ("commit id, unique prefix (>= 4 hex), HEAD, HEAD~N (with an agent: its commits) or a time: "
                + TIME_FORMS)

    p = sub.add_parser("log", help="list commits, newest first (optionally of one agent / file)")
    p.add_argument("agent", nargs="?")
    p.add_argument("file", nargs="?", choices=DURABLE_FILES)
    p.add_argument("-n", type=int, default=0, help="show at most N commits")
    p.add_argument("--repo", default=default_repo)
    p.add_argument("--keyfile", help="key of an encrypted store (default: the systemd credential 'key')")
    p.set_defaults(func=_run(cmd_log))

    p = sub.add_parser("diff", help="unified diff of state between two revisions")
    p.add_argument("rev1", help=rev_help)
    p.add_argument("rev2", help=rev_help)
    p.add_argument("path", nargs="?", help="AGENT or AGENT/FILE to limit the diff")
    p.add_argument("--repo", default=default_repo)
    p.add_argument("--keyfile", help="key of an encrypted store (default: the systemd credential 'key')")
    p.set_defaults(func=_run(cmd_diff))

    p = sub.add_parser("show", help="print a state file as of a revision")
    p.add_argument("rev", help=rev_help)
    p.add_argument("path", help="AGENT/FILE, e.g. a1/config.json")
    p.add_argument("--envelope", action="store_true",
                   help="wrap as {agent_id, state_type, timestamp, version, data}")
    p.add_argument("--repo", default=default_repo)
    p.add_argument("--keyfile", help="key of an encrypted store (default: the systemd credential 'key')")
    p.set_defaults(func=_run(cmd_show))

    p = sub.add_parser("restore", help="make a past version current again (a new commit)")
    p.add_argument("agent")
    p.add_argument("file", choices=DURABLE_FILES)
    p.add_argument("rev", help=rev_help)
    p.add_argument("--repo", default=default_repo)
    p.add_argument("--keyfile", help="key of an encrypted store (default: the systemd credential 'key')")
    p.set_defaults(func=_run(cmd_restore))
