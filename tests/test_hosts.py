"""TLS between hosts: chirp nodes in separate processes on private network hosts.

Every test builds its own hosts with tests/netns.py (network namespaces joined
by a veth pair, addresses 10.213.<k>.1 and .2 that exist only inside them) and
runs nodes there as processes of tests/hostproc.py. Between the hosts the peer
address is not loopback, so both sides use TLS
(docs/tls.md#when-a-connection-is-encrypted). Checked:

* messages both ways, in both modes, over TLS (each node once as TLS client,
  once as TLS server), arriving intact (sha256 per message), 1 MiB included;
* a node whose chain comes from a foreign CA is refused in both directions,
  with a ConnectionError naming the TLS reason, and nothing is delivered; also
  when that node trusts our CA, so that our node's verification must refuse it;
* a plaintext node (DISABLE_ENCRYPTION) is refused in both directions;
* the TLS policy as raw Python TLS clients see it: TLS 1.3 by default,
  DHE-RSA-AES256-GCM-SHA384 under TLS 1.2, chirp inside TLS; refused: ECDHE or
  AES-128 only offers, TLS 1.1, no client certificate, a foreign certificate;
* a raw TCP client that stalls in the TLS handshake is dropped after the
  connect timeout min(2 * TIMEOUT, 60) while the node keeps serving a good
  peer; a client that sends a ClientHello from another host gets TLS back;
* loopback stays plaintext: a node with certificates greets 127.0.0.1 and
  ::1 with the 18-byte chirp handshake, on accept and on connect; dialing
  127.0.0.2 between two such nodes fails (the documented mismatch);
* start-up errors for bad certificate files are ValueErrors naming the file
  and the problem (these run in this process; no traffic at all).

The certificates are made once per module with libchirp.pki. When network
namespaces cannot be created (not root, no ``ip``), the multi-host tests fail
with the reason; they never skip.
"""

import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import warnings

import pytest

import libchirp
import libchirp.queue
from libchirp import pki

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import netns  # noqa: E402
from conftest import NODE_START_LIMIT, call_bounded, end_process, find_free_port  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.multiprocess]

HOSTPROC = os.path.join(HERE, "hostproc.py")
MIB = 1 << 20
#: TIMEOUT of the node that must drop stalled handshakes; connect timeout = 1 s.
STALL_TIMEOUT = 0.5
#: The node may drop a stalled client this much before min(2T, 60) (timer granularity).
EARLY_SLACK = 0.2
#: Generous upper bound for the drop on a noisy shared VM.
LATE_LIMIT = 15.0
#: Words that name a TLS failure reason in an error text.
TLS_REASON = re.compile(r"certificate|verif|alert|unknown ca", re.I)


# --------------------------------------------------------------------------------------------
# Certificates (once per module)
# --------------------------------------------------------------------------------------------


class Pki:
    """Paths of the certificate material the tests use."""

    def __init__(self, base):
        self.base = base
        ca, foreign_ca = base / "ca", base / "foreign-ca"
        pki.create_ca(ca, name="test CA")
        pki.create_ca(foreign_ca, name="foreign CA")
        self.a = pki.issue_node(ca, base / "a.pem", name="node a")
        self.b = pki.issue_node(ca, base / "b.pem", name="node b")
        self.foreign = pki.issue_node(foreign_ca, base / "foreign.pem", name="foreign node")
        self.ca_cert = ca / pki.CA_CERT_FILE
        # A foreign node that also trusts our CA: only our side's check can refuse it.
        self.sneaky = base / "sneaky.pem"
        self.sneaky.write_text(self.foreign.read_text() + self.ca_cert.read_text())
        self.dh = pki.write_dh_params(base / "dh.pem")
        blocks_a = pem_blocks(self.a.read_text())
        blocks_b = pem_blocks(self.b.read_text())
        # A chain without a private key: leaf and CA of node a.
        self.nokey = base / "nokey.pem"
        self.nokey.write_text(blocks_a[1] + blocks_a[2])
        # Node b's key with node a's certificate.
        self.mismatch = base / "mismatch.pem"
        self.mismatch.write_text(blocks_b[0] + blocks_a[1] + blocks_a[2])
        self.missing = base / "does-not-exist.pem"


def pem_blocks(text):
    blocks = re.findall(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----\n", text, re.S)
    assert len(blocks) == 3, "expected key, leaf, CA in a pki node file"
    return blocks


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------------------------
# Node processes inside hosts
# --------------------------------------------------------------------------------------------


class Sent:
    """One SENT line of hostproc.py."""

    def __init__(self, words):
        self.tag, self.i, self.status = words[1], int(words[2]), words[3]
        self.identity, self.length, self.sha = words[4], int(words[5]), words[6]
        self.secs = float(words[7])
        self.ok = self.status == "OK"
        self.exc_name = words[8] if not self.ok else None
        self.ecode = words[9] if not self.ok else None
        self.text = " ".join(words[10:]) if not self.ok else ""

    def __repr__(self):
        return "<Sent %s %d %s %s %s>" % (self.tag, self.i, self.status, self.exc_name, self.text)


class Recv:
    """One RECV line of hostproc.py."""

    def __init__(self, words):
        self.n, self.address, self.port = int(words[1]), words[2], int(words[3])
        self.remote_identity, self.identity = words[4], words[5]
        self.header = bytes.fromhex(words[6]) if words[6] != "-" else b""
        self.length, self.sha = int(words[7]), words[8]


class HostProcess:
    """tests/hostproc.py running inside one of the hosts; stdout kept line by line."""

    def __init__(self, hosts, host, role, port, *options):
        self.host, self.port, self.role = host, port, role
        self.argv = [role, "--port", str(port), *[str(o) for o in options]]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = hosts.popen(
            host,
            [sys.executable, HOSTPROC, *self.argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines = []
        self.ended = False
        self.stderr = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.identity = None

    def _pump(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def describe(self):
        return "hostproc %s on host %d (exit %s)\nlast stdout: %s\nstderr:\n%s" % (
            " ".join(self.argv),
            self.host,
            self.proc.poll(),
            self.lines[-8:],
            "\n".join(self.stderr[-30:]),
        )

    def wait_for(self, pred, limit, what):
        """Wait until ``pred(lines)`` returns something true; return it."""
        deadline = time.monotonic() + limit
        with self.cond:
            while True:
                got = pred(self.lines)
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    break
                self.cond.wait(min(left, 0.5))
        time.sleep(0.2)  # let stderr drain
        pytest.fail(
            "%s: %s within %.0f s; %s"
            % (what, "process ended" if self.ended else "nothing", limit, self.describe()),
            pytrace=False,
        )

    def words(self, prefix):
        with self.cond:
            return [ln.split() for ln in self.lines if ln.split()[:1] == [prefix]]

    def ready(self, limit=60.0):
        def find(lines):
            for ln in lines:
                if ln.startswith(("READY ", "START_ERR ")):
                    return ln.split()

        words = self.wait_for(find, limit, "READY")
        if words[0] != "READY":
            pytest.fail("node did not start: %s; %s" % (words, self.describe()), pytrace=False)
        self.identity = words[2]
        return self

    def send(self, ip, port, count, size, window=16, tag="cmd", interval=0.0):
        """Ask the node to send; returns at once (see :meth:`done`)."""
        self.proc.stdin.write(
            "send %s %d %d %d %d %s %s\n" % (ip, port, count, size, window, tag, interval)
        )
        self.proc.stdin.flush()

    def done(self, tag, limit=60.0):
        """Wait for the DONE line of ``tag``; return the SENT records of that tag."""

        def find(lines):
            return any(ln.split()[:2] == ["DONE", tag] for ln in lines)

        self.wait_for(find, limit, "DONE %s" % tag)
        return [Sent(w) for w in self.words("SENT") if w[1] == tag]

    def received(self):
        return [Recv(w) for w in self.words("RECV")]

    def wait_received(self, n, limit=60.0):
        self.wait_for(
            lambda lines: len([1 for ln in lines if ln.startswith("RECV ")]) >= n,
            limit,
            "%d RECV lines" % n,
        )
        return self.received()

    def finish(self, limit=30.0):
        """Close stdin (the node stops) and wait for a clean exit; return COUNT fields."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(
                "process did not exit within %.0f s: %s" % (limit, self.describe()), pytrace=False
            )
        self.wait_for(lambda lines: self.ended, 10, "end of output")
        assert rc == 0, self.describe()
        assert self.words("BYE"), self.describe()
        count = self.words("COUNT")[-1]
        return dict(w.split("=") for w in count[1:])

    def cleanup(self):
        end_process(self.proc)


class Net:
    """The hosts of one test plus the node processes started in them."""

    def __init__(self, n, certs):
        problem = None
        try:
            self.hosts = netns.Hosts(n)
        except netns.NetnsUnavailable as exc:
            problem = str(exc)
        if problem is not None:  # outside the except block: one clear message
            pytest.fail("multi-host tests need network namespaces: " + problem, pytrace=False)
        self.certs = certs
        self.procs = []
        self._ports = iter(range(4100, 5000))

    def addr(self, i):
        return self.hosts.addr(i)

    def node(self, host, role, *options, cert="a", port=None, plaintext=False, ready=True):
        """Start hostproc.py in ``host``; ``cert`` names a chain of :class:`Pki` (a, b,
        foreign, sneaky; ignored if plaintext)."""
        port = port or next(self._ports)  # ports are per host, so fixed numbers are fine
        opts = list(options)
        if plaintext:
            opts.append("--plaintext")
        else:
            opts += ["--cert", getattr(self.certs, cert), "--dh", self.certs.dh]
        p = HostProcess(self.hosts, host, role, port, *opts)
        self.procs.append(p)
        return p.ready() if ready else p

    def close(self):
        try:
            for p in self.procs:
                p.cleanup()
        finally:
            self.hosts.close()  # processes first: a namespace lives as long as they do


@pytest.fixture
def net(certs):
    """``net(n=2)`` builds ``n`` hosts; everything is torn down after the test."""
    made = []

    def make(n=2):
        made.append(Net(n, certs))
        return made[-1]

    try:
        yield make
    finally:
        problems = []
        for n in made:
            try:
                n.close()
            except Exception as exc:
                problems.append(repr(exc))
        if problems:
            pytest.fail("tearing down the hosts failed: " + "; ".join(problems), pytrace=False)


def exception_class(name):
    cls = getattr(libchirp, name, None)
    assert isinstance(cls, type), "unknown exception class %r" % name
    return cls


def check_arrived(sent, received, sender, sender_addr):
    """Every send in ``sent`` succeeded and arrived intact, once, from ``sender``.

    Messages with the same tag (one batch, sent in order) must arrive in order.
    """
    by_id = {}
    for r in received:
        assert r.identity not in by_id, "message %s delivered twice" % r.identity
        by_id[r.identity] = r
    order = {}
    for s in sent:
        assert s.ok, "send failed: %r" % s
        r = by_id.get(s.identity)
        assert r is not None, "message %s (%s #%d) never arrived" % (s.identity, s.tag, s.i)
        assert (r.length, r.sha) == (s.length, s.sha), "message %s altered" % s.identity
        assert r.header == s.tag.encode()
        assert (r.address, r.port, r.remote_identity) == (
            sender_addr,
            sender.port,
            sender.identity,
        )
        order.setdefault(s.tag, []).append(r.n)
    for tag, seen in order.items():
        assert seen == sorted(seen), "messages of batch %r arrived out of order" % tag


# --------------------------------------------------------------------------------------------
# Raw TLS bytes
# --------------------------------------------------------------------------------------------


def client_hello():
    """The first flight of a Python TLS client (a ClientHello record)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 40
    return hello


def recv_exactly(sock, n, limit):
    """Up to ``n`` bytes from ``sock``: fewer if the peer closes or ``limit`` s pass."""
    sock.settimeout(limit)
    buf = b""
    try:
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        pass
    return buf


def time_until_dropped(sock, limit):
    """Seconds until the peer closes ``sock`` (EOF or reset); None if not within ``limit``."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                break
            # A TLS server may answer a full ClientHello; it must not deliver anything else.
    except ConnectionResetError:
        pass
    except socket.timeout:
        return None
    return time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# Tests: messages over TLS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_tls_messages_both_ways(net, sync):
    n = net(2)
    mode = [] if sync else ["--async"]
    count = 40
    # Host 1 dials host 0 (TLS client b, server a); a echoes on that connection.
    echo = n.node(0, "echo", *mode, cert="a")
    sender = n.node(1, "listen", *mode, cert="b")
    sender.send(n.addr(0), echo.port, count, 1000, 8, "small")
    small = sender.done("small")
    sender.send(n.addr(0), echo.port, 1, MIB, 1, "big")
    big = sender.done("big")
    # Host 0 dials a second node on host 1 (TLS client a, server b).
    third = n.node(1, "listen", *mode, cert="b")
    echo.send(n.addr(1), third.port, count, 500, 8, "fromA")
    from_a = echo.done("fromA")
    echo.send(n.addr(1), third.port, 1, MIB, 1, "bigA")
    from_a += echo.done("bigA")

    total = count + 1
    check_arrived(small + big, echo.wait_received(total), sender, n.addr(1))
    # The echoes come back over TLS to the sender: same identity, same bytes.
    check_arrived(small + big, sender.wait_received(total), echo, n.addr(0))
    check_arrived(from_a, third.wait_received(total), echo, n.addr(0))
    assert echo.finish() == {"recv": str(total), "echoed": str(total), "echo_failed": "0"}
    assert sender.finish()["recv"] == str(total)
    assert third.finish()["recv"] == str(total)


# --------------------------------------------------------------------------------------------
# Tests: refused peers
# --------------------------------------------------------------------------------------------


def assert_refused(sent, tls_reason):
    """Every send failed; with ``tls_reason`` as a ConnectionError naming the TLS reason."""
    assert sent and not any(s.ok for s in sent), "a refused peer got a message through: %r" % sent
    print("refused %s: %s" % (sent[0].tag, sorted({(s.exc_name, s.text) for s in sent})))
    for s in sent:
        cls = exception_class(s.exc_name)
        if tls_reason:
            assert issubclass(cls, ConnectionError), s
            assert TLS_REASON.search(s.text), "error text names no TLS reason: %r" % s
        else:
            assert issubclass(cls, (ConnectionError, TimeoutError)), s


@pytest.mark.parametrize(
    "chain", ["foreign", "sneaky"], ids=["foreign-ca", "foreign-ca-trusting-ours"]
)
def test_foreign_ca_refused_both_ways(net, chain):
    """A chain of another CA is refused; "sneaky" also trusts our CA, so our node's own
    verification of the peer certificate is what refuses it (as TLS server and client)."""
    n = net(2)
    ours = n.node(0, "listen", cert="a")
    foreign = n.node(1, "listen", cert=chain)
    foreign.send(n.addr(0), ours.port, 3, 100, 1, "in")
    assert_refused(foreign.done("in"), tls_reason=True)
    ours.send(n.addr(1), foreign.port, 3, 100, 1, "out")
    assert_refused(ours.done("out"), tls_reason=True)

    # Our node still serves a good peer on the same host as the foreign one.
    good = n.node(1, "listen", cert="b")
    good.send(n.addr(0), ours.port, 5, 100, 1, "good")
    good_sent = good.done("good")
    check_arrived(good_sent, ours.wait_received(5), good, n.addr(1))
    time.sleep(0.3)
    assert foreign.finish()["recv"] == "0"
    assert ours.finish()["recv"] == "5", "the foreign node delivered something"
    good.finish()


def test_plaintext_node_refused_both_ways(net):
    n = net(2)
    ours = n.node(0, "listen", cert="a")
    plain = n.node(1, "listen", plaintext=True)
    plain.send(n.addr(0), ours.port, 3, 100, 1, "in")
    assert_refused(plain.done("in"), tls_reason=False)
    ours.send(n.addr(1), plain.port, 3, 100, 1, "out")
    assert_refused(ours.done("out"), tls_reason=False)

    good = n.node(1, "listen", cert="b")
    good.send(n.addr(0), ours.port, 5, 100, 1, "good")
    check_arrived(good.done("good"), ours.wait_received(5), good, n.addr(1))
    time.sleep(0.3)
    assert plain.finish()["recv"] == "0"
    assert ours.finish()["recv"] == "5", "the plaintext node delivered something"
    good.finish()


def raw_tls_client(certs, cert=None, tls12=False, ciphers=None, tls11=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # chirp checks no names (docs/tls.md#what-is-negotiated)
    ctx.load_verify_locations(certs.ca_cert)
    if cert is not None:
        ctx.load_cert_chain(cert)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    if tls11:
        # Only TLS 1.0/1.1; the client's own security level must allow them.
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def test_tls_policy_seen_by_raw_clients(net, certs):
    """Python TLS clients from the other host: versions, TLS 1.2 suites, client certificates."""
    n = net(2)
    node = n.node(0, "listen", cert="a")
    greeting = struct.pack(">H", node.port) + bytes.fromhex(node.identity)
    me = bytes(range(16))
    delivered = 0

    def session(ctx):
        s = n.hosts.socket(1)
        s.settimeout(10)
        s.connect((n.addr(0), node.port))
        return ctx.wrap_socket(s)

    # Good clients: TLS 1.3 by default, DHE-RSA-AES256-GCM-SHA384 when limited to TLS 1.2;
    # the chirp handshake and frames run inside TLS.
    for tls12 in (False, True):
        with session(raw_tls_client(certs, certs.b, tls12=tls12)) as t:
            if tls12:
                assert t.version() == "TLSv1.2"
                assert t.cipher()[0] in {
                    "DHE-RSA-AES256-GCM-SHA384",
                    "DHE-RSA-AES256-SHA256",
                }, t.cipher()
            else:
                assert t.version() == "TLSv1.3", t.version()
            assert recv_exactly(t, 18, 10) == greeting
            tag = b"raw12" if tls12 else b"raw13"
            t.sendall(struct.pack(">H", 4999) + me + data_frame(os.urandom(16), tag, b"x" * 100))
            delivered += 1
            got = node.wait_received(delivered, 20)[-1]
            assert (got.address, got.port, got.header, got.length) == (n.addr(1), 4999, tag, 100)

    # Refused: ECDHE-only or AES128 TLS 1.2 offers, TLS 1.1, a client without a certificate
    # (TLS 1.3 and 1.2), a client with a foreign certificate that trusts our CA.
    refused = {
        "ecdhe-only": raw_tls_client(
            certs, certs.b, tls12=True, ciphers="ECDHE-RSA-AES256-GCM-SHA384"
        ),
        "dhe-aes128": raw_tls_client(
            certs, certs.b, tls12=True, ciphers="DHE-RSA-AES128-GCM-SHA256"
        ),
        "tls1.1": raw_tls_client(certs, certs.b, tls11=True),
        "no-cert": raw_tls_client(certs),
        "no-cert-tls12": raw_tls_client(certs, tls12=True),
        "foreign-cert": raw_tls_client(certs, certs.foreign),
    }
    for name, ctx in refused.items():
        try:
            with session(ctx) as t:
                # TLS 1.3: the client finishes first; the server's verdict arrives as an alert.
                t.sendall(struct.pack(">H", 4999) + me + data_frame(os.urandom(16), b"bad", b"x"))
                data = t.recv(100)
                assert not data, "%s: the node answered a refused client: %r" % (name, data)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            print("%s refused: %s" % (name, exc))
        else:
            print("%s refused: closed" % name)
    time.sleep(0.3)
    assert node.finish()["recv"] == str(delivered), "a refused raw client delivered a message"


# --------------------------------------------------------------------------------------------
# Tests: stalled handshakes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stall", ["silent", "partial-hello"])
def test_stalled_tls_handshake_dropped_while_serving(net, stall):
    n = net(2)
    node = n.node(0, "listen", "--timeout", STALL_TIMEOUT, cert="a")
    good = n.node(1, "listen", cert="b")
    connect_timeout = min(2 * STALL_TIMEOUT, 60)

    hello = client_hello()
    stallers = []
    for _ in range(3):
        s = n.hosts.socket(1)
        s.settimeout(10)
        s.connect((n.addr(0), node.port))
        if stall == "partial-hello":
            s.sendall(hello[: len(hello) // 2])
        stallers.append((s, time.monotonic()))

    # The good peer opens its own TLS connection and keeps sending during the stall.
    good.send(n.addr(0), node.port, 25, 200, 1, "during", 0.1)
    results = {}

    def watch(i, s, t0):
        left = time_until_dropped(s, LATE_LIMIT)
        results[i] = None if left is None else time.monotonic() - t0

    watchers = [
        threading.Thread(target=watch, args=(i, s, t0), daemon=True)
        for i, (s, t0) in enumerate(stallers)
    ]
    for w in watchers:
        w.start()
    sent = good.done("during")
    for w in watchers:
        w.join(LATE_LIMIT + 5)
    for s, _ in stallers:
        s.close()

    print(
        "stall %s: dropped after %s s (connect timeout %.1f s); good sends %.2f s"
        % (
            stall,
            [round(results.get(i) or -1, 2) for i in range(len(stallers))],
            connect_timeout,
            sum(s.secs for s in sent) + 0.1 * len(sent),
        )
    )
    assert all(s.ok for s in sent), "good peer failed during the stall: %r" % sent
    assert len(sent) == 25
    for i in range(len(stallers)):
        dropped = results.get(i)
        assert dropped is not None, "stalled client %d not dropped within %.0f s" % (i, LATE_LIMIT)
        assert dropped >= connect_timeout - EARLY_SLACK, (
            "stalled client dropped after %.2f s, before the connect timeout %.1f s"
            % (dropped, connect_timeout)
        )
    # The good peer's sends spanned the stall period.
    check_arrived(sent, node.wait_received(25), good, n.addr(1))
    assert node.finish()["recv"] == "25"
    good.finish()


# --------------------------------------------------------------------------------------------
# Tests: loopback stays plaintext
# --------------------------------------------------------------------------------------------


def data_frame(identity, header, data, serial=1):
    return (
        identity
        + struct.pack(">IIHB", serial, len(data), len(header), 0x00)  # asynchronous data
        + header
        + data
    )


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_loopback_stays_plaintext(net, family):
    n = net(2)
    node = n.node(0, "listen", "--async", cert="a")
    loopback = "127.0.0.1" if family == socket.AF_INET else "::1"
    greeting = struct.pack(">H", node.port) + bytes.fromhex(node.identity)

    # Accepting side: the node's first bytes are its 18-byte chirp handshake.
    s = n.hosts.socket(0, family)
    s.settimeout(10)
    s.connect((loopback, node.port))
    first = recv_exactly(s, 18, 10)
    assert first[:1] != b"\x16", "the node started TLS on loopback"
    assert first == greeting
    # And a plaintext message from this raw peer is delivered.
    me = bytes(range(16))
    s.sendall(struct.pack(">H", 4999) + me + data_frame(b"\x01" * 16, b"raw", b"over loopback"))
    (got,) = node.wait_received(1, 20)
    assert (got.address, got.port, got.header) == (loopback, 4999, b"raw")
    assert got.remote_identity == me.hex() and got.length == len(b"over loopback")
    s.close()

    # Connecting side: the node dials loopback and greets in plaintext too.
    listener = n.hosts.socket(0, family)
    listener.bind((loopback, 0))
    listener.listen(1)
    listener.settimeout(10)
    node.send(loopback, listener.getsockname()[1], 1, 10, 1, "dial")
    conn, _ = listener.accept()
    assert recv_exactly(conn, 18, 10) == greeting
    conn.close()
    listener.close()
    node.done("dial")  # fails (the raw peer closed); it must just complete

    # From the other host, the same node answers a ClientHello with a TLS record.
    s = n.hosts.socket(1)
    s.settimeout(10)
    s.connect((n.addr(0), node.port))
    s.sendall(client_hello())
    reply = recv_exactly(s, 3, 10)
    assert reply[:1] == b"\x16" and reply[1:2] == b"\x03", "no TLS from a non-loopback peer"
    s.close()
    node.finish()


def test_other_loopback_address_is_a_mismatch(net):
    """Dialing 127.0.0.2: the connector encrypts, the acceptor (source 127.0.0.1) does not."""
    n = net(2)
    a = n.node(0, "listen", cert="a")
    b = n.node(0, "listen", cert="b")
    a.send("127.0.0.2", b.port, 1, 10, 1, "mismatch")
    (sent,) = a.done("mismatch")
    print("127.0.0.2: %r" % sent)
    assert not sent.ok
    assert issubclass(exception_class(sent.exc_name), (ConnectionError, TimeoutError)), sent
    # The exact loopback address works.
    a.send("127.0.0.1", b.port, 2, 10, 1, "exact")
    check_arrived(a.done("exact"), b.wait_received(2), a, "127.0.0.1")
    a.finish()
    assert b.finish()["recv"] == "2"


# --------------------------------------------------------------------------------------------
# Tests: configuration errors at start (in this process; nothing is sent)
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case, problem",
    [
        ("missing", r"does not exist|not found|no such file"),
        ("nokey", r"no private key|private key.*(missing|not found)"),
        ("mismatch", r"does not match|mismatch"),
        ("missing-dh", r"does not exist|not found|no such file"),
    ],
)
def test_bad_certificate_files_fail_at_start(loop, certs, case, problem):
    cfg = libchirp.Config()
    cfg.PORT = find_free_port()
    cfg.CERT_CHAIN_PEM = {
        "missing": certs.missing,
        "nokey": certs.nokey,
        "mismatch": certs.mismatch,
    }.get(case, certs.a)
    cfg.DH_PARAMS_PEM = certs.missing if case == "missing-dh" else certs.dh
    named = cfg.DH_PARAMS_PEM if case == "missing-dh" else cfg.CERT_CHAIN_PEM
    with pytest.raises(ValueError) as info:
        node = call_bounded(libchirp.queue.Chirp, NODE_START_LIMIT, "node start", loop, cfg)
        node.stop()
    text = str(info.value)
    assert str(named) in text, "the error does not name the file: %r" % text
    assert re.search(problem, text, re.I), "the error does not say what is wrong: %r" % text
    assert info.value.ecode == 1


def test_good_certificate_files_start(loop, certs):
    cfg = libchirp.Config()
    cfg.PORT = find_free_port()
    cfg.CERT_CHAIN_PEM = certs.a
    cfg.DH_PARAMS_PEM = certs.dh
    node = call_bounded(libchirp.queue.Chirp, NODE_START_LIMIT, "node start", loop, cfg)
    call_bounded(node.stop, 20, "node stop")
