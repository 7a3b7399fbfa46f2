"""The sd_notify protocol as the daemon speaks it, read from a real datagram socket.

No systemd here (see test_systemd.py for that): the test plays systemd's part by
binding ``$NOTIFY_SOCKET`` itself, which checks the exact messages and their order.
"""

import os
import signal
import socket
import time

import pytest


class NotifySocket:
    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict] = []

    def drain(self, until=None, timeout=30.0):
        """Collect messages until ``until(msg)`` is true for one (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(msg)
            if until and until(msg):
                return msg
        if until:
            raise AssertionError(f"no matching notification; got {self.messages}")
        return None


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    # An abstract-namespace name ("@..."), as systemd uses for services in containers.
    name = f"agentstatefs-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield ns
    ns.sock.close()


def test_ready_status_watchdog_stopping(mounts, notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    m = mounts()
    m.start(wait=False)  # NOTIFY_SOCKET implies --systemd: foreground, <N> log prefixes
    ready = notify_socket.drain(until=lambda msg: "READY" in msg)
    assert ready["READY"] == "1"
    # READY=1 is sent only once the mount answers: it must answer now, without waiting.
    assert os.path.ismount(m.mp)
    os.statvfs(m.mp)
    assert ready["STATUS"].startswith(f"serving {m.mp}, 0 agents")

    os.mkdir(m / "a1")
    (m / "a1/config.json").write_text('{"x": 1}')
    # Watchdog pings keep coming, and STATUS follows the commits.
    notify_socket.drain(until=lambda msg: "1 agents" in msg.get("STATUS", ""))
    pings = [msg for msg in notify_socket.messages if msg.get("WATCHDOG") == "1"]
    assert pings, notify_socket.messages

    assert m.stop(signal.SIGTERM) == 0
    stop = notify_socket.drain(until=lambda msg: "STOPPING" in msg)
    assert stop["STOPPING"] == "1" and "SIGTERM" in stop["STATUS"]
    log = m.log()
    assert "<6>INFO agentstatefs" in log, log  # journald priority prefixes
    assert not os.path.ismount(m.mp)


def test_watchdog_pid_of_another_process_means_no_pings(mounts, notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # not the daemon: it must not ping
    m = mounts()
    m.start(wait=False)
    notify_socket.drain(until=lambda msg: "READY" in msg)
    os.mkdir(m / "a1")  # activity, so there would be pings and STATUS updates
    notify_socket.drain(until=lambda msg: "1 agents" in msg.get("STATUS", ""), timeout=30)
    assert not [msg for msg in notify_socket.messages if "WATCHDOG" in msg]
    assert m.stop() == 0


def test_no_notify_socket_is_a_no_op(mounts, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    m = mounts().start()
    os.mkdir(m / "a1")
    assert m.stop() == 0


def test_unreachable_notify_socket_does_not_kill_the_daemon(mounts, monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    m = mounts().start()
    os.mkdir(m / "a1")
    (m / "a1/memory.json").write_text("[]")
    assert (m / "a1/memory.json").read_text() == "[]"
    assert m.stop() == 0
    assert "cannot notify systemd" in m.log()
