"""Programs written for libchirp-py 1.x run unchanged, and the errors a new user meets say
what to do (README.md "Compatibility with libchirp 1.x", docs/config.md, docs/interfaces.md).
"""

import asyncio
import logging
import time

import pytest
from conftest import NODE_START_LIMIT, NODE_STOP_LIMIT, make_config

import libchirp
import libchirp.asyncio
import libchirp.queue

pytestmark = pytest.mark.timeout(60)


# -- Loop ------------------------------------------------------------------------------------------


def test_loop_stop_before_run_is_a_no_op_and_run_starts_it(bounded):
    loop = libchirp.Loop(run_loop=False)
    bounded(loop.stop, 10, "stop() before run()")
    assert not loop.running
    loop.run()
    try:
        assert loop.running
        cfg = make_config()
        node = bounded(libchirp.queue.Chirp, NODE_START_LIMIT, "node start", loop, cfg)
        bounded(node.stop, NODE_STOP_LIMIT, "node stop")
    finally:
        bounded(loop.stop, 10, "stop()")
    assert not loop.running
    with pytest.raises(RuntimeError):
        loop.run()


def test_loop_logs_start_and_stop_at_debug(caplog, bounded):
    with caplog.at_level(logging.DEBUG, logger="libchirp"):
        loop = libchirp.Loop()
        bounded(loop.stop, 10, "stop()")
    texts = [r.getMessage() for r in caplog.records if r.name == "libchirp"]
    levels = {r.levelno for r in caplog.records if r.name == "libchirp"}
    assert any("loop started" in t for t in texts), texts
    assert any("loop stopped" in t for t in texts), texts
    assert levels == {logging.DEBUG}


# -- Config and Message ranges ---------------------------------------------------------------------


def test_config_out_of_range_is_overflow_and_value_error():
    cfg = libchirp.Config()
    for name, bad in (("PORT", 65536), ("PORT", 80), ("MAX_SLOTS", 33), ("TIMEOUT", 5000.0)):
        with pytest.raises(OverflowError):  # as documented by 1.x
            setattr(cfg, name, bad)
        with pytest.raises(ValueError, match="Config.%s" % name):
            setattr(cfg, name, bad)


def test_message_port_out_of_range_is_assertion_and_value_error():
    msg = libchirp.queue.Message()
    with pytest.raises(AssertionError):  # 1.x checked with assert
        msg.port = 65536
    with pytest.raises(ValueError):
        msg.port = -1


def test_default_config_asks_for_a_certificate_first(loop, bounded):
    with pytest.raises(ValueError) as info:
        bounded(libchirp.queue.Chirp, NODE_START_LIMIT, "node start", loop, libchirp.Config())
    text = str(info.value)
    assert text.startswith("Config: CERT_CHAIN_PEM must be set."), text
    assert "DISABLE_ENCRYPTION" in text


def test_port_zero_picks_a_free_port(make_node):
    node = make_node(PORT=0)
    assert 1024 < node.port <= 65535


# -- sending -------------------------------------------------------------------------------------


def test_send_without_an_address_raises_value_error(make_node):
    node = make_node(SYNCHRONOUS=False)
    msg = libchirp.queue.Message()
    msg.port = node.port
    msg.data = b"where to?"
    with pytest.raises(ValueError, match="address was never set"):
        node.send(msg)
    with pytest.raises(ValueError, match="address was never set"):
        node.request(msg)
    with pytest.raises(ValueError, match="address was never set"):
        node.send_many([msg])
    msg.address = "127.0.0.1"
    got = node.send(msg).result(10)
    assert got is msg
    assert node.get(timeout=10).data == b"where to?"


def test_request_timeout_names_the_peer_and_the_seconds(make_node):
    quiet = make_node(AUTO_RELEASE=False)  # receives, never answers
    node = make_node(TIMEOUT=0.5)
    msg = make_node.message(quiet, b"anybody?")
    fut = node.request(msg)
    with pytest.raises(TimeoutError) as info:
        fut.result(10)
    text = str(info.value)
    assert text.startswith("Chirp request timed out"), text
    assert "127.0.0.1:%d" % quiet.port in text and "0.5 s" in text, text
    quiet.get(timeout=10).release_slot().result(10)


# -- asyncio before its loop runs ------------------------------------------------------------------


def test_asyncio_send_and_request_before_the_asyncio_loop_runs(make_node, bounded):
    """1.x programs call send()/request() on the loop's thread before run_until_complete()."""
    echo = make_node()
    aloop = asyncio.new_event_loop()
    chirp_loop = bounded(libchirp.Loop, 10, "Loop()")
    node = None
    try:
        node = bounded(
            libchirp.asyncio.Chirp, NODE_START_LIMIT, "asyncio node", chirp_loop,
            make_config(SYNCHRONOUS=False),
            aloop,
        )  # fmt: skip
        msg = libchirp.asyncio.Message()
        msg.address, msg.port, msg.data = "127.0.0.1", echo.port, b"one"
        sent = node.send(msg)
        assert isinstance(sent, asyncio.Future) and not aloop.is_running()
        question = libchirp.asyncio.Message()
        question.address, question.port, question.data = "127.0.0.1", echo.port, b"two"
        answer = node.request(question)

        async def main():
            done = await asyncio.wait_for(sent, 10)
            assert done is msg
            got = echo.get(timeout=10)  # the first message
            got.release_slot()
            got = await asyncio.get_running_loop().run_in_executor(None, echo.get, True, 10)
            assert got.data == b"two"
            got.data = b"answer"
            answered = echo.send(got)  # completes once the reply is released (on await)
            reply = await asyncio.wait_for(answer, 10)
            await asyncio.get_running_loop().run_in_executor(None, answered.result, 10)
            return reply.data

        assert aloop.run_until_complete(asyncio.wait_for(main(), 30)) == b"answer"
        aloop.run_until_complete(node.astop())
    finally:
        if node is not None and not node._stopped:
            bounded(node.stop, NODE_STOP_LIMIT, "node stop")
        bounded(chirp_loop.stop, 10, "Loop.stop()")
        aloop.close()


# -- MAX_MSG_SIZE ----------------------------------------------------------------------------------


def test_send_over_the_peers_max_msg_size_fails_before_it_leaves(make_node):
    """Between two nodes of ours the receiver announces MAX_MSG_SIZE (docs/extensions.md)."""
    small = make_node(MAX_MSG_SIZE=1000)
    node = make_node()
    first = make_node.message(small, b"x" * 10)
    sent = node.send(first)
    small.get(timeout=10)  # AUTO_RELEASE: the ACK follows the announcement on the connection
    assert sent.result(10) is first
    start = time.monotonic()
    big = make_node.message(small, b"y" * 2000, header=b"h" * 10)
    with pytest.raises(ValueError) as info:
        node.send(big).result(10)
    text = str(info.value)
    assert "2010" in text and "1000" in text and "MAX_MSG_SIZE" in text, text
    assert time.monotonic() - start < 5
    again = make_node.message(small, b"z" * 990)  # the connection is still open
    sent = node.send(again)
    assert small.get(timeout=10).data == b"z" * 990
    assert sent.result(10) is again
    counters = node.statistics()["remotes"]["127.0.0.1:%d" % small.port]["counters"]
    assert counters["connects"] == 1 and counters["protocol_errors"] == 0


def test_peer_closing_on_a_large_message_says_it_may_exceed_max_msg_size(h):
    """A 1.x peer announces nothing; when it closes on a message, the error says why that may be."""
    import rawpeer as rp

    node, _ = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    server = h.server(name="1.x peer with a small MAX_MSG_SIZE")
    fut = node.send(rp.make_msg(server.port, b"", b"q" * 5000))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, bytes(range(0xB0, 0xC0)))
    while True:  # our capability NOOP first (a 1.x peer ignores it), then the data frame
        _, _, data_len, _, type_ = rp.unpack_header(conn.recv_exact(rp.HEADER_LEN, 5.0, "header"))
        if not type_ & rp.NOOP:
            break
    assert data_len == 5000  # a 1.x reader over its MAX_MSG_SIZE closes here
    conn.abort()
    exc = rp.future_error(fut, 10.0, "send to the closing peer")
    text = str(exc)
    assert isinstance(exc, ConnectionError), repr(exc)
    assert "peer closed the connection" in text and "5000 bytes" in text, text
    assert "may exceed its MAX_MSG_SIZE" in text, text


# -- typing ----------------------------------------------------------------------------------------


def test_mypy_finds_the_installed_package(tmp_path):
    """After `make build` a program outside the checkout type-checks against libchirp (py.typed)."""
    import subprocess
    import sys

    pytest.importorskip("mypy")
    prog = tmp_path / "prog.py"
    prog.write_text(
        "import libchirp\n"
        "from libchirp.queue import Chirp, Message\n\n\n"
        "def first(loop: libchirp.Loop, config: libchirp.Config) -> bytes:\n"
        "    with Chirp(loop, config) as node:\n"
        "        msg: Message = node.get()\n"
        "        return msg.data\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text("from libchirp.queue import Chirp\n\n\ndef f(node: Chirp) -> str:\n"
                   "    return node.get().data\n")  # fmt: skip
    cmd = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache")]
    ok = subprocess.run(cmd + [str(prog)], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run(cmd + [str(bad)], cwd=tmp_path, capture_output=True, text=True)
    assert wrong.returncode == 1 and 'got "bytes"' in wrong.stdout, wrong.stdout + wrong.stderr
