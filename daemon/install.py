"""Verbs for running agentstatefs as a host service.

``install-systemd`` puts the unit template, tenant settings and the mount(8) helper in
place; ``clean-mount`` detaches a dead mount left by a killed daemon (the unit's
``ExecStartPre=``). See docs/operations.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from .options import DEFAULT_MOUNTPOINT, DEFAULT_REPO_ROOT, DEFAULT_TENANT, MountOptions

UNIT_NAME = "agentstatefs@.service"
UNIT_BIN = "/usr/local/bin/agentstatefs"  # what the shipped template says; replaced on install
CONF_DIR = "/etc/agentstatefs"
HELPER_NAME = "mount.fuse.agentstatefs"
DOC_PATH = "/usr/local/share/doc/agentstatefs/operations.md"  # the unit's Documentation=
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # becomes a unit instance name and a directory


def template_text() -> str:
    """The unit template shipped in systemd/ (source checkout or installed package)."""
    here = Path(__file__).resolve().parent.parent / "systemd" / UNIT_NAME
    if here.is_file():
        return here.read_text()
    try:  # installed as package data
        return resources.files("agentstatefs").joinpath("systemd", UNIT_NAME).read_text()
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        raise SystemExit(f"agentstatefs: cannot find the unit template {UNIT_NAME}") from None


def render_unit(binary: str, conf_dir: str = CONF_DIR) -> str:
    """The template with the agentstatefs command at ``binary`` and settings in ``conf_dir``."""
    if not os.path.isabs(binary) or any(c.isspace() for c in binary):
        raise ValueError(f"the agentstatefs command path must be absolute without spaces: {binary!r}")
    text = template_text().replace(UNIT_BIN, binary)
    if conf_dir != CONF_DIR:
        text = text.replace(f"EnvironmentFile=-{CONF_DIR}/", f"EnvironmentFile=-{conf_dir.rstrip('/')}/")
    return text


def default_mountpoint(tenant: str) -> str:
    return DEFAULT_MOUNTPOINT if tenant == DEFAULT_TENANT else f"{DEFAULT_MOUNTPOINT}-{tenant}"


def render_conf(tenant: str, mountpoint: str, options: str = "") -> str:
    return (f"# agentstatefs tenant '{tenant}': read by agentstatefs@{tenant}.service at each start.\n"
            f"# Repository: {DEFAULT_REPO_ROOT}/{tenant} (the unit's StateDirectory).\n"
            f"# Options (-o): see `agentstatefs mount --help`, e.g. allow_other,history=visible\n"
            f"MOUNTPOINT={mountpoint}\n"
            f"OPTIONS={options}\n"
            f"# Extra flags for `agentstatefs mount`, e.g. --debug\n"
            f"DAEMON_ARGS=\n")


def _own_binary() -> str:
    """Absolute path of the agentstatefs command running now (the venv's, typically)."""
    exe = Path(sys.argv[0])
    if exe.name == "agentstatefs" and exe.exists():
        return str(exe.absolute())
    found = shutil.which("agentstatefs") or os.path.join(os.path.dirname(sys.executable), "agentstatefs")
    return os.path.abspath(found)


def _write(path: Path, text: str, mode: int, force: bool, quiet: bool) -> bool:
    if path.exists() and not force:
        if path.read_text() == text:
            return False
        if not quiet:
            print(f"kept {path} (exists and differs; --force replaces it)")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")
    return True


def _systemd_running(root: Path) -> bool:
    return str(root) == "/" and os.path.isdir("/run/systemd/system")


def cmd_install_systemd(args) -> int:
    root = Path(args.root).absolute()
    binary = os.path.abspath(args.bin) if args.bin else _own_binary()
    if not os.access(binary, os.X_OK):
        print(f"agentstatefs: {binary} is not an executable agentstatefs command (use --bin)", file=sys.stderr)
        return 2
    tenants = args.tenant or []
    for t in tenants:
        if not _TENANT.fullmatch(t) or t.startswith("."):
            print(f"agentstatefs: bad tenant name {t!r} (1-64 of A-Z a-z 0-9 _ . -, not starting with .)",
                  file=sys.stderr)
            return 2
    if args.mountpoint and len(tenants) != 1:
        print("agentstatefs: --mountpoint needs exactly one --tenant", file=sys.stderr)
        return 2
    if args.options:
        try:
            MountOptions.parse([args.options])
        except ValueError as exc:
            print(f"agentstatefs: {exc}", file=sys.stderr)
            return 2
    if args.mountpoint and not os.path.isabs(args.mountpoint):
        print(f"agentstatefs: the mount point must be an absolute path: {args.mountpoint}", file=sys.stderr)
        return 2
    try:
        unit_text = render_unit(binary)
    except ValueError as exc:
        print(f"agentstatefs: {exc}", file=sys.stderr)
        return 2

    unit_path = root / args.unit_dir.lstrip("/") / UNIT_NAME
    _write(unit_path, unit_text, 0o644, force=True, quiet=args.quiet)
    doc = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
    if doc.is_file():  # the unit's Documentation= (a source checkout has it)
        _write(root / DOC_PATH.lstrip("/"), doc.read_text(), 0o644, force=True, quiet=args.quiet)
    conf_dir = root / CONF_DIR.lstrip("/")
    conf_dir.mkdir(parents=True, exist_ok=True)
    for t in tenants:
        mp = args.mountpoint or default_mountpoint(t)
        _write(conf_dir / f"{t}.conf", render_conf(t, mp, args.options or ""), 0o644,
               force=args.force, quiet=args.quiet)

    helper_src = Path(binary).with_name(HELPER_NAME)
    if helper_src.exists() and not args.no_helper:
        link = root / args.helper_dir.lstrip("/") / HELPER_NAME
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(helper_src)
        if not args.quiet:
            print(f"linked {link} -> {helper_src}")
    elif not args.no_helper and not args.quiet:
        print(f"note: {helper_src} not found; fstab mounts need it (reinstall the package)")

    if _systemd_running(root) and not args.no_reload:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        if not args.quiet:
            print("ran systemctl daemon-reload")
    if not args.quiet:
        names = " ".join(f"agentstatefs@{t}" for t in tenants) or "agentstatefs@default"
        print(f"next: systemctl enable --now {names}")
    return 0


def cmd_clean_mount(args) -> int:
    """Detach ``mountpoint`` if it is a dead FUSE mount; leave anything else alone."""
    from . import logs, mount  # imports pyfuse3: only this verb needs it
    # Under systemd (ExecStartPre=) stderr goes to the journal: use <N> priority prefixes.
    logs.setup(systemd=bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID")))
    mp = os.path.abspath(args.mountpoint)
    try:
        os.stat(mp)
        if os.path.ismount(mp):
            os.statvfs(mp)  # stat may be answered from the kernel's cache; statfs never is
        dead = False
    except OSError as exc:
        dead = exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    try:
        mount.clean_stale_mount(mp)
    except mount.MountError as exc:
        mount.log.error("clean-mount: %s", exc)
        return 1
    if dead:
        mount.log.info("clean-mount: detached the dead mount at %s", mp)
    return 0


def register(sub) -> None:
    i = sub.add_parser(
        "install-systemd", help="install the systemd unit template, tenant settings and fstab helper",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Install agentstatefs@.service (pointing at this agentstatefs command), "
                    f"{CONF_DIR}/TENANT.conf for each --tenant (never overwritten without --force), "
                    f"and /sbin/{HELPER_NAME} for /etc/fstab and .mount units. Then run "
                    "`systemctl enable --now agentstatefs@TENANT`.")
    i.add_argument("--tenant", action="append", metavar="NAME",
                   help="write settings for this tenant (repeatable); default tenant 'default' "
                        f"mounts at {DEFAULT_MOUNTPOINT}, others at {DEFAULT_MOUNTPOINT}-NAME")
    i.add_argument("--mountpoint", help="mount point for the single --tenant given")
    i.add_argument("-o", dest="options", metavar="OPTS", help="mount options for the tenant settings")
    i.add_argument("--root", default="/", help="install below this directory instead of / (packaging, tests)")
    i.add_argument("--bin", help="agentstatefs command the unit runs (default: this one)")
    i.add_argument("--unit-dir", default="/etc/systemd/system", help="default /etc/systemd/system")
    i.add_argument("--helper-dir", default="/sbin", help=f"where mount(8) finds {HELPER_NAME} (default /sbin)")
    i.add_argument("--no-helper", action="store_true", help=f"do not link {HELPER_NAME}")
    i.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    i.add_argument("--force", action="store_true", help="replace existing tenant settings")
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(func=cmd_install_systemd)

    c = sub.add_parser("clean-mount", help="detach a dead mount left by a killed daemon",
                       description="If MOUNTPOINT is a FUSE mount whose daemon is gone ('Transport "
                                   "endpoint is not connected'), detach it. A live mount or a plain "
                                   "directory is left alone. Used by the unit's ExecStartPre=.")
    c.add_argument("mountpoint")
    c.set_defaults(func=cmd_clean_mount)
