"""Fault tests: peers that die, vanish, restart, stall or never read.

Real processes and real sockets throughout: the other node runs as a child
process (tests/nodeproc.py on loopback, tests/hostproc.py inside the private
hosts of tests/netns.py where a network is needed) or as a raw socket of
tests/rawpeer.py. Checked:

1. a receiver SIGKILLed in the middle of a stream, sender in both modes:
   every send completes; synchronous: none succeeds unless the receiver had
   durably recorded it (fsync before release); asynchronous: what was still
   queued or in flight completes, failures are ConnectionErrors; in both
   modes sends after the death fail with a ConnectionError;
2. the link between two hosts taken down during synchronous traffic: every
   send completes within a bound derived from TIMEOUT, failures are
   TimeoutError or ConnectionError; after the link is back, new sends succeed
   on a fresh connection (the sender's connect and timeout counters);
3. a peer SIGKILLed and restarted on the same port: a send while it is down
   fails with a ConnectionError, the next sends reconnect and succeed (the
   echoes carry the new process's identity);
4. raw clients that connect and stall (nothing, a partial handshake, a
   partial frame header, a partial frame body) are closed after the connect
   timeout min(2T, 60) or the idle timeout 2R, while a normal peer is served
   meanwhile, each send well within the stall timeout;
5. a peer that handshakes and then never reads, sent 1 MiB messages: the
   sends that cannot be written fail with TimeoutError within bounds, and the
   node keeps doing roundtrips with another peer meanwhile.

No test has a timed lower bound; upper bounds are generous for a loaded
2-core machine. Network namespaces need root; without them the test fails
with the reason (as in test_hosts.py), it never skips.
"""

import collections
import concurrent.futures
import json
import os
import sys
import threading
import time

import pytest

from libchirp.stats import remote_key

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import rawpeer  # noqa: E402
from conftest import wait_for  # noqa: E402
from test_hosts import Net, check_arrived, exception_class  # noqa: E402
from test_multiprocess import NodeProcess  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.multiprocess]

MIB = 1 << 20
#: Slack added to every bound that is derived from TIMEOUT (loaded machine).
SLACK = 10.0
#: Reconnect back-off after a failed connection (remote.c: 50 + rand % 500 ms).
BACKOFF = 0.55


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def settle(fut, limit, what):
    """Wait for ``fut`` at most ``limit`` s (a pending future fails the test); return its
    exception or None."""
    done, _ = concurrent.futures.wait([fut], timeout=limit)
    if not done:
        pytest.fail("%s still pending after %.0f s (hang)" % (what, limit), pytrace=False)
    return fut.exception()


def timed(fut):
    """Record when ``fut`` completes: returns a list that gets the time.monotonic()."""
    box = []
    fut.add_done_callback(lambda _: box.append(time.monotonic()))
    return box


def errors_by_class(excs):
    return dict(collections.Counter(type(e).__name__ for e in excs))


def remote_connections(node, port, address="127.0.0.1"):
    remote = node.statistics()["remotes"].get(remote_key(address, port))
    return remote["connections"] if remote else 0


@pytest.fixture
def procs():
    """Child processes (tests/nodeproc.py) of a test; leftovers are killed at teardown."""
    started = []
    yield started
    for p in started:
        p.cleanup()


def spawn(procs, *args):
    p = NodeProcess(*[str(a) for a in args])
    procs.append(p)
    return p


@pytest.fixture
def hosts2():
    """Two private hosts (tests/netns.py) for plaintext hostproc.py nodes."""
    made = []

    def make():
        made.append(Net(2, certs=None))  # fails the test if namespaces are unavailable
        return made[-1]

    yield make
    for n in made:
        n.close()


# --------------------------------------------------------------------------------------------
# 1. Receiver SIGKILLed mid-stream
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_receiver_killed_mid_stream(make_node, procs, free_ports, tmp_path, sync):
    mode = [] if sync else ["--async"]
    record = tmp_path / "received.txt"
    receiver = spawn(procs, "record", "--port", free_ports(), "--record", record, *mode)
    port, _ = receiver.ready()
    timeout = 2.0
    sender = make_node(SYNCHRONOUS=sync, TIMEOUT=timeout)

    window, kill_after, after_kill = 8, 150, 5
    futs = {}  # message number -> future
    pending = collections.deque()
    ok = 0
    at_kill = None  # message numbers not complete when the receiver was killed
    n = 0
    while at_kill is None:
        while len(pending) < window:
            futs[n] = sender.send(rawpeer.make_msg(port, data=b"%d" % n))
            pending.append(n)
            n += 1
        i = pending.popleft()
        if settle(futs[i], 30, "send %d before the kill" % i) is None:
            ok += 1
        else:
            break  # reported below: the stream broke before the kill
        if ok >= kill_after:
            at_kill = [j for j in pending if not futs[j].done()]
            receiver.kill()
    assert at_kill is not None, "send failed before the kill: %r" % futs[i].exception()

    # The sender notices the death (EOF or reset) and drops the connection; sends from
    # now on cannot be delivered by anybody.
    wait_for(lambda: remote_connections(sender, port) == 0, 30, "dead peer's connection closed")
    late = list(range(n, n + after_kill))
    for j in late:
        futs[j] = sender.send(rawpeer.make_msg(port, data=b"%d" % j))
    # Every failure costs at most one reconnect back-off plus a connect (refused at once).
    limit = len(futs) * (BACKOFF + 2 * timeout) + SLACK
    results = {j: settle(f, limit, "send %d" % j) for j, f in futs.items()}

    lines = record.read_text().split("\n") if record.exists() else [""]
    recorded = [int(x) for x in lines[:-1]]  # the last one is "" or cut short by the kill
    succeeded = {j for j, e in results.items() if e is None}
    failed = {j: e for j, e in results.items() if e is not None}
    summary = "%s: sent %d, succeeded %d, failed %d %s, recorded %d, in flight at the kill %d" % (
        "sync" if sync else "async",
        len(results),
        len(succeeded),
        len(failed),
        errors_by_class(failed.values()),
        len(recorded),
        len(at_kill),
    )
    print(summary)
    assert len(recorded) == len(set(recorded)), "a message was recorded twice: " + summary
    assert recorded == sorted(recorded), "delivery out of order: " + summary
    assert set(recorded) <= set(results), "recorded a message never sent: " + summary
    for j in late:
        assert isinstance(failed.get(j), ConnectionError), "send %d after the death: %r; %s" % (
            j,
            failed.get(j),
            summary,
        )
    if sync:
        lost = sorted(succeeded - set(recorded))
        assert not lost, "acknowledged but never recorded: %s; %s" % (lost[:10], summary)
        for e in failed.values():
            assert isinstance(e, (ConnectionError, TimeoutError)), summary
    else:
        # Asynchronous success means "written to the socket", so a send may succeed
        # without being received; a failure must name the broken connection.
        for e in failed.values():
            assert isinstance(e, ConnectionError), summary


# --------------------------------------------------------------------------------------------
# 2. Link down between two hosts during traffic
# --------------------------------------------------------------------------------------------


def host_stats(proc):
    """statistics() of a hostproc.py node, via its ``stats`` command."""
    before = len(proc.words("STATS"))
    proc.proc.stdin.write("stats\n")
    proc.proc.stdin.flush()
    proc.wait_for(lambda lines: len(proc.words("STATS")) > before, 30, "STATS")
    return json.loads(" ".join(proc.words("STATS")[before][1:]))


def set_link(net, host, state):
    res = net.hosts.run(host, ["ip", "link", "set", "eth0", state])
    assert res.returncode == 0, "ip link set eth0 %s: %s" % (state, res.stderr)


def reachable(net, host, addr):
    """True if a TCP connect from ``host`` to a closed port of ``addr`` is refused."""
    s = net.hosts.socket(host)
    s.settimeout(1.0)
    try:
        s.connect((addr, 9))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return True


def test_link_down_during_traffic(hosts2):
    n = hosts2()
    timeout = 1.0
    opts = ("--timeout", timeout)
    receiver = n.node(0, "listen", *opts, plaintext=True)
    sender = n.node(1, "listen", *opts, plaintext=True)
    addr = n.addr(0)

    sender.send(addr, receiver.port, 5, 200, 1, "before")
    check_arrived(sender.done("before"), receiver.wait_received(5), sender, n.addr(1))
    stats0 = host_stats(sender)["totals"]

    # Synchronous traffic, one message at a time; the link dies after a few arrived,
    # and one more message is sent while it is certainly down.
    count = 6
    sender.send(addr, receiver.port, count, 200, 1, "during", 0.2)
    receiver.wait_received(5 + 2)
    set_link(n, 0, "down")
    sender.send(addr, receiver.port, 1, 200, 1, "down")
    # Bound per send: in flight T, or a reconnect back-off and the connect timeout 2T.
    bound = 3 * timeout + BACKOFF + SLACK
    limit = (count + 1) * (3 * timeout + BACKOFF) + SLACK
    during = sender.done("during", limit=limit)
    down = sender.done("down", limit=limit)
    failed = [s for s in during + down if not s.ok]
    print(
        "link down: %d ok, %d failed %s, seconds %s"
        % (
            len(during) + len(down) - len(failed),
            len(failed),
            dict(collections.Counter(s.exc_name for s in failed)),
            [s.secs for s in during + down],
        )
    )
    assert (len(during), len(down)) == (count, 1)
    assert not down[0].ok, "a send succeeded while the link was down"
    for s in failed:
        assert issubclass(exception_class(s.exc_name), (TimeoutError, ConnectionError)), s
        assert s.secs <= bound, "send failed after %.1f s (bound %.1f s): %r" % (
            s.secs,
            bound,
            s,
        )
    # Acknowledged means received.
    delivered = [s for s in during if s.ok]
    check_arrived(delivered, receiver.received(), sender, n.addr(1))

    set_link(n, 0, "up")
    wait_for(lambda: reachable(n, 1, addr), 30, "host 0 reachable again")
    sender.send(addr, receiver.port, 5, 200, 1, "after")
    after = sender.done("after")
    check_arrived(after, receiver.wait_received(5 + len(delivered) + 5), sender, n.addr(1))
    stats1 = host_stats(sender)["totals"]
    print("sender totals before %s after %s" % (stats0, stats1))
    assert stats1["timeouts"] > stats0["timeouts"], "no connection closed by a timeout"
    assert stats1["connects"] > stats0["connects"], "the sends after the outage reused a connection"
    sender.finish()
    receiver.finish()


# --------------------------------------------------------------------------------------------
# 3. Peer restarts on the same port
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_peer_restart_same_port(make_node, procs, free_ports, sync):
    mode = [] if sync else ["--async"]
    port = free_ports()
    timeout = 2.0
    node = make_node(SYNCHRONOUS=sync, TIMEOUT=timeout)

    def exchange(peer_id, tag):
        futs = [node.send(rawpeer.make_msg(port, tag, b"%d" % i)) for i in range(5)]
        for i in range(5):
            got = rawpeer.get_msg(node, 10, "echo %d of %s" % (i, tag))
            assert (got.header, got.data) == (tag, b"%d" % i)
            assert got.remote_identity == peer_id, "echo from another process"
        for i, f in enumerate(futs):
            assert settle(f, 10, "send %d of %s" % (i, tag)) is None

    first = spawn(procs, "echo", "--port", port, *mode)
    _, first_id = first.ready()
    exchange(first_id, b"first")
    first.kill()

    # While nobody listens, a send fails with a ConnectionError.
    wait_for(lambda: remote_connections(node, port) == 0, 30, "dead peer's connection closed")
    down = settle(node.send(rawpeer.make_msg(port, b"down")), 2 * timeout + SLACK, "send (down)")
    assert isinstance(down, ConnectionError), repr(down)

    second = spawn(procs, "echo", "--port", port, *mode)
    _, second_id = second.ready()
    assert second_id != first_id
    exchange(second_id, b"second")
    counters = node.statistics()["remotes"][remote_key("127.0.0.1", port)]["counters"]
    print("remote counters: %s" % counters)
    assert counters["connects"] >= 2
    second.finish()


# --------------------------------------------------------------------------------------------
# 4. Half-open and stalled peers
# --------------------------------------------------------------------------------------------


def test_stalled_peers_closed_while_serving(make_node):
    timeout, reuse = 1.0, 0.5
    node = make_node(TIMEOUT=timeout, REUSE_TIME=reuse)
    port = make_node.port(node)
    connect_timeout = min(2 * timeout, 60)
    idle = max(reuse, 3 * timeout)  # R: an idle connection is closed within 2R
    frame = rawpeer.pack_frame(bytes(16), 1, 0x00, b"stall", b"x" * 100)
    # Stalled peers and what they send before they stall; the bound for the node to
    # close them: the connect timeout before the handshake is through, else 2R.
    kinds = {
        "silent": (None, connect_timeout),
        "partial-handshake": (rawpeer.pack_handshake(4000, rawpeer.CLIENT_ID)[:7], connect_timeout),
        "partial-header": (frame[:10], 2 * idle),
        "partial-body": (frame[:40], 2 * idle),
    }
    stallers = {}
    for kind, (first, _) in kinds.items():
        peer = rawpeer.connect(port, name=kind)
        if kind != "silent":
            peer.recv_handshake()
        if kind.startswith("partial-") and kind != "partial-handshake":
            peer.send_handshake(4001 + len(stallers), rawpeer.CLIENT_ID)
        if first:
            peer.send(first)
        stallers[kind] = (peer, time.monotonic())

    closed_after = {}

    def watch(kind, peer, t0):
        if peer.wait_closed(kinds[kind][1] + SLACK):
            closed_after[kind] = time.monotonic() - t0

    # A slow peer is not a stalled one: a frame trickling in for longer than 2R,
    # a few bytes at a time, is received whole.
    slow = rawpeer.connect(port, name="slow")
    slow.recv_handshake()
    slow.send_handshake(4100, rawpeer.CLIENT_ID)
    slow_data = bytes(range(256)) * 2
    slow_frame = rawpeer.pack_frame(bytes([7]) * 16, 1, 0x00, b"slow", slow_data)
    trickle_secs = 2 * idle + 1
    trickle_error = []

    def trickle():
        pause = trickle_secs / (len(slow_frame) // 16)
        try:
            for i in range(0, len(slow_frame), 16):
                slow.send(slow_frame[i : i + 16])
                time.sleep(pause)
        except OSError as exc:
            trickle_error.append(exc)

    threads = [
        threading.Thread(target=watch, args=(kind, peer, t0), daemon=True)
        for kind, (peer, t0) in stallers.items()
    ] + [threading.Thread(target=trickle, daemon=True)]
    for t in threads:
        t.start()

    # Meanwhile a normal peer is served: every synchronous send (a roundtrip with the
    # ACK) completes well within the stall timeout.
    good = make_node(TIMEOUT=timeout)
    spans = []
    for i in range(10):
        t0 = time.monotonic()
        fut = good.send(rawpeer.make_msg(port, b"good", b"%d" % i))
        got = rawpeer.get_msg(node, connect_timeout, "good message %d" % i)  # releases it
        assert (got.header, got.data) == (b"good", b"%d" % i)
        assert settle(fut, connect_timeout, "good send %d" % i) is None, repr(fut.exception())
        spans.append(time.monotonic() - t0)
        time.sleep(0.05)

    got = rawpeer.get_msg(node, trickle_secs + SLACK, "slowly sent message")
    assert (got.header, got.data) == (b"slow", slow_data)
    for t in threads:
        t.join(max(bound for _, bound in kinds.values()) + SLACK + 5)
    for peer, _ in stallers.values():
        peer.close()
    slow.close()
    print(
        "stalled peers closed after %s s (bounds %s); good sends took at most %.3f s"
        % (
            {k: round(v, 2) for k, v in closed_after.items()},
            {k: b for k, (_, b) in kinds.items()},
            max(spans),
        )
    )
    assert not trickle_error, "the node closed the slow peer: %r" % trickle_error
    for kind, (_, bound) in kinds.items():
        assert kind in closed_after, "stalled peer %r not closed within %.0f s" % (
            kind,
            bound + SLACK,
        )
    stats = node.statistics()
    assert stats["totals"]["timeouts"] >= 2, stats["totals"]


# --------------------------------------------------------------------------------------------
# 5. A peer that never reads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_never_reading_peer(make_node, sync):
    timeout = 1.0
    node = make_node(SYNCHRONOUS=sync, TIMEOUT=timeout)
    other = make_node(SYNCHRONOUS=sync, TIMEOUT=timeout)
    count = 3 if sync else 12
    with rawpeer.SilentServer(handshake=True, read=False) as silent:
        t0 = time.monotonic()
        futs = [node.send(rawpeer.make_msg(silent.port, b"big", b"x" * MIB)) for _ in range(count)]
        ends = [timed(f) for f in futs]

        # Roundtrips with another peer while the big sends are stuck.
        roundtrips = meanwhile = 0
        limit = count * (timeout + BACKOFF) + SLACK
        while not all(f.done() for f in futs):
            assert time.monotonic() - t0 < limit, "big sends still pending after %.0f s" % limit
            msg = rawpeer.make_msg(make_node.port(other), b"ping", b"%d" % roundtrips)
            ping = node.send(msg)
            got = rawpeer.get_msg(other, 5, "ping %d" % roundtrips)  # releases it
            pong = other.send(got)  # back to its sender
            back = rawpeer.get_msg(node, 5, "pong %d" % roundtrips)
            assert back.identity == msg.identity
            assert settle(ping, 5, "ping") is None, repr(ping.exception())
            assert settle(pong, 5, "pong") is None, repr(pong.exception())
            roundtrips += 1
            meanwhile += not all(f.done() for f in futs)
            time.sleep(0.05)
        results = [settle(f, 1, "big send") for f in futs]
    secs = [round(e[0] - t0, 2) for e in ends]
    failed = [e for e in results if e is not None]
    print(
        "never-reading peer: %d of %d big sends failed %s, completed after %s s; "
        "%d roundtrips meanwhile" % (len(failed), count, errors_by_class(failed), secs, meanwhile)
    )
    assert meanwhile >= 1, "no roundtrip completed while the big sends were stuck"
    assert failed, "every 1 MiB send to a peer that never reads succeeded"
    for e in failed:
        assert isinstance(e, TimeoutError), repr(e)
    if sync:
        assert len(failed) == count, "a synchronous send succeeded without an ACK"
    # Serialized: each failure costs at most T plus a reconnect back-off.
    for i, s in enumerate(sorted(secs)):
        assert s <= (i + 1) * (timeout + BACKOFF) + SLACK, secs
    assert node.statistics()["totals"]["timeouts"] >= len(failed)
