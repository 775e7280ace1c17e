"""Private test hosts: Linux network namespaces joined by virtual Ethernet.

Theory of operation
-------------------
Chirp decides per connection whether to use TLS from the peer's address
(docs/tls.md#when-a-connection-is-encrypted): only exactly ``127.0.0.1`` and ``::1``
are plaintext. To test TLS between "hosts" without touching any real network, :class:`Hosts`
builds a tiny network that exists only for one test:

* ``n`` network namespaces named ``chirphost-<pid>-<seq>-a``, ``-b``, ... (the
  pid and a per-process sequence number make the names unique per test run);
* for two hosts, one veth pair between them; for more, every host gets a veth
  to a bridge in an extra ``-hub`` namespace;
* host ``i`` gets ``10.213.<k>.<i+1>/24`` on its ``eth0`` (``k`` differs between
  the Hosts of one process). The addresses live only inside those namespaces,
  so traffic between them never leaves the machine and cannot reach anything
  else; the root namespace gets no interface, address or route;
* ``lo`` is up in every host, so each also has its own 127.0.0.1.

Commands run inside a host with ``ip netns exec`` (:meth:`Hosts.popen`,
:meth:`Hosts.run`); :meth:`Hosts.socket` creates a socket of the calling
process inside a host (a short-lived thread joins the namespace with
``setns(2)``; the socket stays in that namespace whichever thread uses it).

:meth:`Hosts.close` (also on leaving a ``with`` block) deletes the namespaces,
which destroys their interfaces. Stop the processes running inside first: a
namespace that still holds processes lives on, unnamed, until they exit.
Namespaces left behind by a test run that was killed are removed by the next
:class:`Hosts` created (only names of this module's pattern whose pid is dead).

Everything here needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and the ``ip``
tool (iproute2). When either is missing, creating :class:`Hosts` raises
:class:`NetnsUnavailable` with the reason; tests turn that into a failure, never
a skip. The module does not import pytest, so benchmarks can use it too.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import socket as _socket
import subprocess
import threading
from typing import List, Optional, Sequence

__all__ = ["Hosts", "NetnsUnavailable", "NETNS_DIR"]

NETNS_DIR = "/run/netns"
PREFIX = "chirphost"
_NAME_RE = re.compile(r"^%s-(\d+)-\d+-[a-z]+$" % PREFIX)
_CLONE_NEWNET = 0x40000000
_IP_TIMEOUT = 20.0

_seq = itertools.count(1)
_seq_lock = threading.Lock()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here; the text says why."""


def _ip_tool() -> str:
    ip = shutil.which("ip") or next(
        (
            p
            for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    if ip is None:
        raise NetnsUnavailable(
            "the 'ip' tool (iproute2) is not installed; multi-host tests need it "
            "(Debian: apt-get install iproute2)"
        )
    return ip


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _libc_setns():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class Hosts:
    """``n`` private hosts (network namespaces) that can reach each other.

    ``hosts.names[i]`` is the namespace name, ``hosts.addr(i)`` the IPv4 address
    of host ``i``. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, n: int = 2) -> None:
        if not 2 <= n <= 26:
            raise ValueError("Hosts needs 2..26 hosts (got %d)" % n)
        self.n = n
        self._ip = _ip_tool()
        if os.geteuid() != 0:
            raise NetnsUnavailable(
                "creating network namespaces needs root (euid is %d); "
                "run the multi-host tests as root, as CI does" % os.geteuid()
            )
        with _seq_lock:
            seq = next(_seq)
        pid = os.getpid()
        self.subnet = "10.213.%d" % ((pid + seq) % 250 + 1)
        base = "%s-%d-%d" % (PREFIX, pid, seq)
        self.names: List[str] = [base + "-" + chr(ord("a") + i) for i in range(n)]
        self.hub: Optional[str] = base + "-hub" if n > 2 else None
        self._created: List[str] = []
        self.closed = False
        _remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------

    def _ipcmd(self, *args: str, what: Optional[str] = None) -> str:
        try:
            res = subprocess.run(
                [self._ip, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_IP_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise NetnsUnavailable(
                "'ip %s' hung for %.0f s" % (" ".join(args), _IP_TIMEOUT)
            ) from None
        if res.returncode != 0:
            raise NetnsUnavailable(
                "%s failed: 'ip %s' exited with %d: %s"
                % (what or "network setup", " ".join(args), res.returncode, res.stderr.strip())
            )
        return res.stdout

    def _add_ns(self, name: str) -> None:
        self._ipcmd("netns", "add", name, what="creating network namespace %s" % name)
        self._created.append(name)
        self._ipcmd("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        for name in self.names:
            self._add_ns(name)
        if self.hub is None:
            a, b = self.names
            self._ipcmd(
                "link", "add", "eth0", "netns", a, "type", "veth", "peer", "name", "eth0",
                "netns", b, what="creating the veth pair",
            )  # fmt: skip
        else:
            self._add_ns(self.hub)
            self._ipcmd("-n", self.hub, "link", "add", "br0", "type", "bridge")
            self._ipcmd("-n", self.hub, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                port = "p%d" % i
                self._ipcmd(
                    "link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", port,
                    "netns", self.hub, what="creating the veth of %s" % name,
                )  # fmt: skip
                self._ipcmd("-n", self.hub, "link", "set", port, "master", "br0")
                self._ipcmd("-n", self.hub, "link", "set", port, "up")
        for i, name in enumerate(self.names):
            self._ipcmd("-n", name, "addr", "add", "%s/24" % self.addr(i), "dev", "eth0")
            self._ipcmd("-n", name, "link", "set", "eth0", "up")

    # -- use ------------------------------------------------------------------------------

    def addr(self, i: int) -> str:
        """The IPv4 address of host ``i`` (text)."""
        if not 0 <= i < self.n:
            raise IndexError("no host %d (have %d)" % (i, self.n))
        return "%s.%d" % (self.subnet, i + 1)

    def command(self, i: int, argv: Sequence[str]) -> List[str]:
        """The argv that runs ``argv`` inside host ``i``."""
        return [self._ip, "netns", "exec", self.names[i], *[str(a) for a in argv]]

    def popen(self, i: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside host ``i``."""
        self._check_open()
        return subprocess.Popen(self.command(i, argv), **kwargs)

    def run(self, i: int, argv: Sequence[str], timeout: float = 30.0, **kwargs):
        """``subprocess.run`` of ``argv`` inside host ``i`` (output captured as text)."""
        self._check_open()
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(i, argv), timeout=timeout, **kwargs)

    def socket(
        self, i: int, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM
    ) -> _socket.socket:
        """A socket of this process that lives in host ``i``'s network namespace."""
        self._check_open()
        box = {}

        def make() -> None:
            try:
                fd = os.open(os.path.join(NETNS_DIR, self.names[i]), os.O_RDONLY)
                try:
                    if _libc_setns()(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, "setns(%s): %s" % (self.names[i], os.strerror(err)))
                finally:
                    os.close(fd)
                # This thread is now inside the namespace; it ends right after.
                box["sock"] = _socket.socket(family, type)
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=make, name="netns-socket", daemon=True)
        t.start()
        t.join(10)
        if "error" in box:
            raise box["error"]
        if "sock" not in box:
            raise RuntimeError("creating a socket in %s did not finish" % self.names[i])
        return box["sock"]

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("these hosts are closed")

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace created (idempotent; never raises for a missing one)."""
        self.closed = True
        problems = []
        while self._created:
            name = self._created.pop()
            try:
                res = subprocess.run(
                    [self._ip, "netns", "delete", name],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=_IP_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                problems.append("%s: 'ip netns delete' hung" % name)
                continue
            if res.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
                problems.append("%s: %s" % (name, res.stderr.strip()))
        if problems:
            raise RuntimeError("could not delete network namespaces: " + "; ".join(problems))

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<Hosts %s %s.0/24%s>" % (self.names, self.subnet, " closed" if self.closed else "")


def _remove_stale() -> None:
    """Delete namespaces of this module's pattern left by processes that are gone."""
    try:
        entries = os.listdir(NETNS_DIR)
    except OSError:
        return
    ip = shutil.which("ip") or "ip"
    for name in entries:
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            subprocess.run(
                [ip, "netns", "delete", name],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_IP_TIMEOUT,
            )
