"""Run a throw-away systemd (PID 1 of fresh pid+mount+uts+ipc namespaces) for tests.

Requirements: root, systemd installed (not running), hybrid or v2 cgroups mounted.
Adapted from the team's reference (shared/reference/systemd-ns/sdns.py); additions:
``binds`` (directories bind-mounted inside the namespace only, e.g. a temp dir over
/var/lib so StateDirectory= stays out of the host).
"""
import glob, os, pty, subprocess, threading, time, uuid

NSINIT = r'''
set -e
# --- keep every side effect inside this mount namespace -----------------------------
mount -t tmpfs -o mode=755,nosuid,nodev sdns-run /run          # private /run (systemd's sockets)
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys  # no host sysctl bumps
# systemd mkdirs in /sys/fs/cgroup and remounts that tmpfs *superblock* read-only,
# which would hit the host: give it a fresh tmpfs holding binds of the real hierarchies.
if [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ]; then
  mkdir /run/cg && mount -t tmpfs -o mode=755 sdns-cg /run/cg
  for d in /sys/fs/cgroup/*; do
    if mountpoint -q "$d"; then mkdir "/run/cg/${d##*/}"; mount --bind "$d" "/run/cg/${d##*/}"
    elif [ -L "$d" ]; then cp -P "$d" /run/cg/; fi
  done
  umount -l /sys/fs/cgroup && mount --move /run/cg /sys/fs/cgroup && rmdir /run/cg
fi
# Only $SDNS_SHARED may propagate back to the host (systemd unmounts all mount units on exit).
findmnt -rn -o TARGET,PROPAGATION | while read -r t p; do
  t=$(printf '%b' "$t")
  case "$p" in shared*) [ "$t" = "$SDNS_SHARED" ] || mount --make-slave "$t";; esac
done
# Drop our copies of foreign FUSE mounts: a copy would keep the other daemon's
# connection alive after its owner unmounts it on the host.
findmnt -rn -o TARGET,FSTYPE | while read -r t fs; do
  t=$(printf '%b' "$t")
  case "$fs" in fuse|fuse.*|fuseblk) ;; *) continue;; esac
  case "$t" in "$SDNS_SHARED"/*) continue;; esac
  umount -l "$t" || true
done
mount -t tmpfs tmpfs /var/log/journal 2>/dev/null || true   # keep journald volatile
# /run shared within the namespace, as on a booted host: systemd builds LoadCredential=
# directories in a child namespace and moves them into /run/credentials, which needs
# /run to propagate back. The tmpfs exists only here, so nothing reaches the host.
mount --make-shared /run
# Namespace-only bind mounts "SRC=DST;SRC=DST" (e.g. a temp dir over /var/lib).
IFS=';'; for b in $SDNS_BINDS; do [ -n "$b" ] && mount --bind "${b%%=*}" "${b#*=}"; done; unset IFS
mount --bind "$SDNS_CONSOLE" /dev/console                    # pty -> we capture PID1 log
exec env -i container=sdns PATH=/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_UNIT_PATH="$SDNS_UNIT_PATH" \
  /lib/systemd/systemd --system --unit=test.target --log-target=console \
  --log-level="$SDNS_LOG_LEVEL" --show-status=no
'''


class SystemdNS:
    def __init__(self, unit_dirs, shared_dir, log_path, log_level='info', binds=()):
        self.shared = os.path.realpath(shared_dir)
        self.binds = ';'.join(f'{src}={dst}' for src, dst in binds)
        self.name = 'sdns-' + uuid.uuid4().hex[:8]
        self.unit_dirs, self.log_path, self.log_level = unit_dirs, log_path, log_level
        self.cgroups = [f'/sys/fs/cgroup/{h}/{self.name}' for h in ('unified', 'systemd')
                        if os.path.isdir(f'/sys/fs/cgroup/{h}')] or [f'/sys/fs/cgroup/{self.name}']

    def start(self, timeout=20):
        t0 = time.monotonic()
        for cg in self.cgroups:
            os.mkdir(cg)
        master, slave = pty.openpty()
        self._master = master
        env = dict(os.environ, SDNS_CONSOLE=os.ttyname(slave), SDNS_LOG_LEVEL=self.log_level,
                   SDNS_UNIT_PATH=':'.join(self.unit_dirs), SDNS_SHARED=self.shared,
                   SDNS_BINDS=self.binds)
        def pre():
            for cg in self.cgroups:
                with open(cg + '/cgroup.procs', 'w') as f:
                    f.write(str(os.getpid()))
        self.proc = subprocess.Popen(
            ['unshare', '--pid', '--fork', '--mount', '--uts', '--ipc', '--propagation', 'unchanged',
             '--mount-proc', 'bash', '-c', NSINIT],
            env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, preexec_fn=pre,
            start_new_session=True)
        os.close(slave)
        self._log = open(self.log_path, 'wb')
        threading.Thread(target=self._pump, daemon=True).start()
        # host pid of the namespace's PID 1 = child of unshare
        while time.monotonic() - t0 < timeout:
            kids = open(f'/proc/{self.proc.pid}/task/{self.proc.pid}/children').read().split()
            if kids and os.readlink(f'/proc/{kids[0]}/exe').endswith('/systemd'):
                self.pid1 = int(kids[0])
                r = self.systemctl('is-system-running', check=False, timeout=5)
                if r.stdout.strip() in ('running', 'degraded'):
                    self.startup_s = time.monotonic() - t0
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f'namespace died rc={self.proc.returncode}, see {self.log_path}')
            time.sleep(0.05)
        raise TimeoutError('systemd did not come up')

    def _pump(self):
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:
                break
            if not data:
                break
            self._log.write(data); self._log.flush()

    def run(self, *cmd, check=True, timeout=60):
        """Run a command inside the namespaces (sees /run/systemd/private, ns pids)."""
        return subprocess.run(['nsenter', '-t', str(self.pid1), '-m', '-p', '-u', '-i', *cmd],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def systemctl(self, *args, **kw):
        return self.run('systemctl', '--no-pager', *args, **kw)

    def prop(self, unit, name):
        return self.systemctl('show', '-P', name, unit).stdout.strip()

    def host_pids(self, unit):
        """Host pids of a unit's processes. Template instances live in a per-template
        slice (system.slice/system-NAME.slice/NAME@i.service), so search below system.slice."""
        for cg in self.cgroups:  # cgroup.procs lists host-namespace pids
            for p in glob.glob(f'{cg}/system.slice/**/{unit}/cgroup.procs', recursive=True):
                return [int(x) for x in open(p).read().split()]
        return []

    def stop(self, timeout=20):
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.systemctl('exit', check=False, timeout=timeout)  # stops all units (ExecStop runs)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid1, 9)  # SIGKILL to ns PID1 kills the whole pid namespace
                self.proc.wait(5)
        for cg in self.cgroups:  # remove the (now empty) cgroup trees bottom-up
            for root, dirs, _ in os.walk(cg, topdown=False):
                os.rmdir(root)
        self.stop_s = time.monotonic() - t0
        time.sleep(0.1); os.close(self._master)

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()
