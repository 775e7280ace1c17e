"""Node statistics: ``Chirp.statistics()`` built from the core's ch_node_stats.

Counters are checked with exact values where the traffic is exact (messages and
bytes of a known exchange) and as lower bounds where the core may legitimately
count more than once (connects, errors).
"""

import concurrent.futures
import socket
import struct
import threading
import time

import pytest
from conftest import find_free_port
from rawpeer import SilentServer

import libchirp
import libchirp.stats

WAIT = 10.0


def settle(fut, limit=WAIT, what="future"):
    done, _ = concurrent.futures.wait([fut], timeout=limit)
    assert done, "%s still pending after %.0f s" % (what, limit)
    return fut.exception()


def wait_stats(node, pred, what, limit=WAIT):
    """Poll statistics() until ``pred(stats)`` holds; return the stats."""
    deadline = time.monotonic() + limit
    while True:
        stats = node.statistics(timeout=WAIT)
        if pred(stats):
            return stats
        if time.monotonic() > deadline:
            pytest.fail("%s not reached within %.0f s: %r" % (what, limit, stats), pytrace=False)
        time.sleep(0.02)


def check_shape(stats):
    """Every key of the TypedDicts is present with the right type."""
    assert set(stats) == set(libchirp.stats.NodeStats.__annotations__)
    counter_keys = set(libchirp.stats.CounterStats.__annotations__)
    assert set(stats["totals"]) == counter_keys
    assert all(isinstance(v, int) and v >= 0 for v in stats["totals"].values())
    for key, remote in stats["remotes"].items():
        assert set(remote) == set(libchirp.stats.RemoteStats.__annotations__)
        assert key == libchirp.stats.remote_key(remote["address"], remote["port"])
        assert set(remote["counters"]) == counter_keys
        assert isinstance(remote["idle"], float) and remote["idle"] >= 0.0


@pytest.mark.timeout(60)
def test_traffic_counters_after_an_exchange(make_node):
    receiver = make_node()
    sender = make_node()
    sizes = 0
    for i in range(3):
        msg = make_node.message(receiver, data=b"d" * (10 * i + 1), header=b"hh")
        sizes += len(msg.header) + len(msg.data)
        fut = sender.send(msg)
        assert receiver.get(timeout=WAIT).data == msg.data
        assert settle(fut) is None

    s = sender.statistics()
    check_shape(s)
    assert s["port"] == make_node.port(sender) and s["identity"] == sender.identity().hex()
    assert s["totals"]["messages_out"] == 3 and s["totals"]["bytes_out"] == sizes
    assert s["totals"]["messages_in"] == 0
    assert s["totals"]["connects"] >= 1 and s["connections"] >= 1
    key = "127.0.0.1:%d" % make_node.port(receiver)
    assert key in s["remotes"], s["remotes"].keys()
    out = s["remotes"][key]
    assert out["counters"]["messages_out"] == 3 and out["counters"]["bytes_out"] == sizes
    assert out["connections"] >= 1 and out["send_queue"] == 0 and out["in_flight"] == 0
    assert s["pending_sends"] == 0 and s["late_replies"] == 0

    r = receiver.statistics()
    check_shape(r)
    assert r["totals"]["messages_in"] == 3 and r["totals"]["bytes_in"] == sizes
    assert r["totals"]["messages_out"] == 0
    key = "127.0.0.1:%d" % make_node.port(sender)  # the sender's handshake port
    assert key in r["remotes"], r["remotes"].keys()
    assert r["remotes"][key]["counters"]["messages_in"] == 3
    assert r["remotes"][key]["slots_in_use"] == 0
    assert r["held_messages"] == 0


@pytest.mark.timeout(60)
def test_slots_in_use_and_held_messages(make_node):
    receiver = make_node(SYNCHRONOUS=False, MAX_SLOTS=4, AUTO_RELEASE=False)
    sender = make_node(SYNCHRONOUS=False)
    for i in range(3):
        assert settle(sender.send(make_node.message(receiver, data=b"%d" % i))) is None
    held = [receiver.get(timeout=WAIT) for _ in range(3)]
    key = "127.0.0.1:%d" % make_node.port(sender)
    s = receiver.statistics()
    assert s["remotes"][key]["slots_in_use"] == 3
    assert s["held_messages"] == 3
    for m in held:
        assert settle(m.release_slot()) is None
    s = wait_stats(receiver, lambda s: s["remotes"][key]["slots_in_use"] == 0, "slots released")
    assert s["held_messages"] == 0


@pytest.mark.timeout(60)
def test_send_queue_and_in_flight(make_node, bounded):
    with SilentServer(handshake=True) as srv:
        sender = make_node(TIMEOUT=30.0)
        futs = [sender.send(make_node.message(port=srv.port, data=b"%d" % i)) for i in range(5)]
        key = "127.0.0.1:%d" % srv.port
        s = wait_stats(
            sender,
            lambda s: key in s["remotes"] and s["remotes"][key]["in_flight"] == 1,
            "first message in flight",
        )
        remote = s["remotes"][key]
        assert remote["send_queue"] == 4, remote  # synchronous: one at a time
        assert s["pending_sends"] == 5
        bounded(sender.stop, 20, "stop()")
    for f in futs:
        assert isinstance(settle(f), ConnectionError)


@pytest.mark.timeout(60)
def test_failure_counters(make_node):
    node = make_node(TIMEOUT=0.5)
    exc = settle(node.send(make_node.message(port=find_free_port(), data=b"x")), 20)
    assert isinstance(exc, ConnectionError), repr(exc)
    s = wait_stats(node, lambda s: s["totals"]["send_failures"] >= 1, "send failure counted")
    with SilentServer(handshake=True) as srv:
        exc = settle(node.send(make_node.message(port=srv.port, data=b"y")), 20)
        assert isinstance(exc, TimeoutError), repr(exc)
        s = wait_stats(node, lambda s: s["totals"]["timeouts"] >= 1, "timeout counted")
    assert s["totals"]["send_failures"] >= 2
    assert s["totals"]["messages_out"] == 0


@pytest.mark.timeout(60)
def test_protocol_error_counter(make_node):
    node = make_node()
    port = make_node.port(node)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        raw.sendall(struct.pack(">H", 4000) + b"\xa0" * 16)
        # A NOOP with REQ_ACK (type 0x05) is invalid (docs/protocol.md#wire-format): the node
        # closes.
        raw.sendall(b"\0" * 16 + struct.pack(">IIHB", 1, 0, 0, 0x05))
        raw.settimeout(WAIT)
        try:
            while raw.recv(4096):
                pass
        except OSError:
            pass
    s = wait_stats(node, lambda s: s["totals"]["protocol_errors"] >= 1, "protocol error counted")
    assert s["totals"]["connects"] >= 1


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("ipv6")
def test_ipv6_remote_key(make_node):
    receiver = make_node()
    sender = make_node()
    fut = sender.send(make_node.message(receiver, data=b"six", address="::1"))
    receiver.get(timeout=WAIT)
    assert settle(fut) is None
    key = "[::1]:%d" % make_node.port(receiver)
    remotes = sender.statistics()["remotes"]
    assert key in remotes and remotes[key]["address"] == "::1", remotes.keys()


@pytest.mark.timeout(60)
def test_idle_seconds_grow(make_node):
    receiver = make_node()
    sender = make_node(REUSE_TIME=30.0)
    fut = sender.send(make_node.message(receiver, data=b"x"))
    receiver.get(timeout=WAIT)
    assert settle(fut) is None
    time.sleep(0.6)
    remote = sender.statistics()["remotes"]["127.0.0.1:%d" % make_node.port(receiver)]
    assert 0.4 <= remote["idle"] < 30.0, remote


@pytest.mark.timeout(60)
def test_statistics_is_thread_safe(make_node):
    node = make_node()
    results = []
    errors = []

    def worker():
        try:
            for _ in range(25):
                results.append(node.statistics(timeout=WAIT))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(results) == 200
    assert all(r["port"] == make_node.port(node) for r in results)


@pytest.mark.timeout(60)
def test_statistics_on_the_dispatcher_thread_is_refused(make_node, loop):
    node = make_node()
    box = concurrent.futures.Future()

    def cb():
        try:
            node.statistics()
        except RuntimeError as exc:
            box.set_result(exc)
        else:
            box.set_result(None)

    loop.call_soon(cb)
    assert isinstance(box.result(WAIT), RuntimeError)


@pytest.mark.timeout(60)
def test_statistics_after_stop(make_node, bounded):
    node = make_node()
    bounded(node.stop, 20, "stop()")
    with pytest.raises(ConnectionError):
        node.statistics()


def test_remote_key():
    assert libchirp.stats.remote_key("10.0.0.1", 2998) == "10.0.0.1:2998"
    assert libchirp.stats.remote_key("fe80::1", 3000) == "[fe80::1]:3000"
