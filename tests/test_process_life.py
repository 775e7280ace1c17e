"""Process life: os.fork() with a running Loop, and stop() while threads wait in get()
(docs/reliability.md, "Process life")."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

import pytest
from conftest import SANITIZER, TIMEOUT_SCALE, make_config, wait_for

import libchirp
import libchirp.queue
from libchirp.errors import ChirpShutdown
from libchirp.loop import ChirpForkError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
#: ThreadSanitizer's runtime refuses to start threads in the child of a process
#: that had threads when it forked ("starting new threads after multi-threaded
#: fork is not supported"); these tests fork from a process with a loop running.
FORK_WITH_THREADS = pytest.mark.skipif(
    SANITIZER == "tsan", reason="TSan does not support threads after a multi-threaded fork"
)


def message(port, data=b"x"):
    msg = libchirp.queue.Message()
    msg.address = "127.0.0.1"
    msg.port = port
    msg.data = data
    return msg


def run_in_child(func, limit=30.0):
    """Fork; run func() in the child (exit status 0 if it returns); return the status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            func()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + limit * TIMEOUT_SCALE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish within %.0f s" % limit)
        time.sleep(0.01)


def exchange(loop):
    """Two nodes on loop; one message from a to b. Returns the data received."""
    a = libchirp.queue.Chirp(loop, make_config())
    b = libchirp.queue.Chirp(loop, make_config())
    try:
        sent = a.send(message(b.port, b"from the child"))
        got = b.get(timeout=10)  # AUTO_RELEASE: the ACK completes the send
        sent.result(10)
        return got.data
    finally:
        a.stop()
        b.stop()


def assert_link_works(node, peer, data):
    """A synchronous send from node reaches peer and completes."""
    sent = node.send(message(peer.port, data))
    assert peer.get(timeout=10).data == data
    sent.result(10)


@FORK_WITH_THREADS
@pytest.mark.timeout(60)
def test_fork_inherited_loop_and_node_fail_at_once_new_loop_works():
    parent = os.getpid()
    loop = libchirp.Loop()
    node = libchirp.queue.Chirp(loop, make_config())
    peer = libchirp.queue.Chirp(loop, make_config())
    try:

        def child():
            calls = {
                "send": lambda: node.send(message(peer.port)),
                "send_many": lambda: node.send_many([message(peer.port)]),
                "request": lambda: node.request(message(peer.port)),
                "get": lambda: peer.get(timeout=30),
                "get_many": lambda: peer.get_many(timeout=30),
                "statistics": node.statistics,
                "node.stop": node.stop,
                "loop.stop": loop.stop,
                "loop.call_soon": lambda: loop.call_soon(print, "never"),
            }
            for name, call in calls.items():
                start = time.monotonic()
                with pytest.raises(ChirpForkError) as info:
                    call()
                took = time.monotonic() - start
                assert took < 1.0, "%s took %.2f s to fail" % (name, took)
                text = str(info.value)
                assert "created in process %d" % parent in text, text
                assert "start a new Loop in the child" in text, text
                assert isinstance(info.value, RuntimeError)
            # A Loop of the child's own works.
            with libchirp.Loop() as own:
                assert exchange(own) == b"from the child"

        assert run_in_child(child) == 0
        # The parent's loop and nodes are untouched by the child.
        assert_link_works(node, peer, b"parent still works")
    finally:
        node.stop()
        peer.stop()
        loop.stop()


@FORK_WITH_THREADS
@pytest.mark.timeout(60)
def test_fork_child_that_drops_inherited_objects_exits_cleanly():
    """Dropping (garbage-collecting) the inherited copies in the child neither
    hangs nor warns about an unstopped loop nor disturbs the parent's sockets."""
    loop = libchirp.Loop()
    node = libchirp.queue.Chirp(loop, make_config())
    peer = libchirp.queue.Chirp(loop, make_config())
    try:
        holder = {"loop": loop, "node": node}

        def child():
            import gc
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error", ResourceWarning)
                holder.clear()
                gc.collect()
            with libchirp.Loop() as own:
                assert exchange(own) == b"from the child"

        assert run_in_child(child) == 0
        assert_link_works(node, peer, b"after the child left")
    finally:
        node.stop()
        peer.stop()
        loop.stop()


@pytest.mark.timeout(30)
def test_stop_wakes_threads_blocked_in_get(make_node):
    node = make_node()
    outcome = []

    def wait(call):
        start = time.monotonic()
        try:
            call()
            outcome.append(("returned", 0.0))
        except ChirpShutdown:
            outcome.append(("shutdown", time.monotonic() - start))
        except Exception as e:  # pragma: no cover - reported below
            outcome.append((repr(e), 0.0))

    calls = [node.get, lambda: node.get(timeout=60), lambda: node.get_many(timeout=60)]
    threads = [threading.Thread(target=wait, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    time.sleep(0.3)
    start = time.monotonic()
    node.stop()
    for t in threads:
        t.join(5 * TIMEOUT_SCALE)
    woke = time.monotonic() - start
    assert [o[0] for o in outcome] == ["shutdown"] * 3, outcome
    assert woke < 2.0 * TIMEOUT_SCALE, woke
    # On a stopped node get() raises at once, whatever its timeout.
    for call in (node.get, lambda: node.get(timeout=30), node.get_nowait, node.get_many):
        start = time.monotonic()
        with pytest.raises(ChirpShutdown):
            call()
        assert time.monotonic() - start < 0.5


@pytest.mark.timeout(30)
def test_stop_hands_out_queued_messages_before_shutdown(make_node):
    """Messages queued when stop() begins are still taken (and released) by get()."""
    sender = make_node()
    node = make_node(SYNCHRONOUS=False)
    sent = sender.send(message(node.port, b"queued"))
    deadline = time.monotonic() + 10
    while not node.qsize():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    got = []
    stopper = threading.Thread(target=node.stop, daemon=True)
    stopper.start()
    got.append(node.get(timeout=5).data)
    stopper.join(10 * TIMEOUT_SCALE)
    assert got == [b"queued"]
    sent.result(10)
    with pytest.raises(ChirpShutdown):
        node.get()


@pytest.mark.timeout(60)
def test_stop_does_not_acknowledge_messages_nobody_took(make_node, caplog):
    """A SYNCHRONOUS send succeeds only once the receiver's application got the
    message: a node that stops with it still queued must not release it."""
    sender = make_node(SYNCHRONOUS=True, TIMEOUT=10.0)
    node = make_node(TIMEOUT=0.5)
    sent = sender.send(message(node.port, b"precious"))
    wait_for(node.qsize, 10, "the message to be queued")
    with caplog.at_level("WARNING", logger="libchirp"):
        node.stop()  # no RuntimeError: the application held nothing
    assert any("never taken" in r.getMessage() for r in caplog.records)
    with pytest.raises(libchirp.ChirpError):
        sent.result(20 * TIMEOUT_SCALE)
    with pytest.raises(ChirpShutdown):
        node.get(timeout=1)


@pytest.mark.timeout(60)
def test_stop_does_not_acknowledge_messages_arriving_meanwhile(make_node):
    """A message that arrives while the node stops (here: while the stop waits
    for a message the application holds) reaches nobody: its SYNCHRONOUS
    send fails instead of succeeding."""
    sender = make_node(SYNCHRONOUS=True, TIMEOUT=10.0)
    node = make_node(TIMEOUT=2.0, AUTO_RELEASE=False)
    first = sender.send(message(node.port, b"held"))  # done when the stop releases it
    held = node.get(timeout=10)
    stopper = threading.Thread(target=lambda: pytest.raises(RuntimeError, node.stop))
    stopper.start()  # waits TIMEOUT for the held message, then releases it and raises
    try:
        wait_for(lambda: node._node.closing, 10, "the stop to begin")
        late = sender.send(message(node.port, b"late"))
        with pytest.raises(libchirp.ChirpError):
            late.result(20 * TIMEOUT_SCALE)
    finally:
        stopper.join(30)
    assert not stopper.is_alive()
    assert held.data == b"held"
    assert first.result(10 * TIMEOUT_SCALE) is not None


@pytest.mark.timeout(60)
def test_dropped_node_does_not_acknowledge_its_queue(make_node, loop):
    """A node garbage-collected with messages queued (never taken) does not
    acknowledge them either: their SYNCHRONOUS sender sees the send fail."""
    sender = make_node(SYNCHRONOUS=True, TIMEOUT=10.0)
    node = libchirp.queue.Chirp(loop, make_config(TIMEOUT=0.5))
    sent = sender.send(message(node.port, b"precious"))
    wait_for(node.qsize, 10, "the message to be queued")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del node
        gc.collect()
    with pytest.raises(libchirp.ChirpError):
        sent.result(20 * TIMEOUT_SCALE)


#: A program blocked in get() when Ctrl-C comes: the KeyboardInterrupt ends the
#: wait, and leaving the with block (stop) and Loop.stop() finish at once.
CTRL_C_QUEUE = """
import libchirp, libchirp.queue
config = libchirp.Config()
config.DISABLE_ENCRYPTION = True
config.PORT = 0
loop = libchirp.Loop()
try:
    with libchirp.queue.Chirp(loop, config) as node:
        print("ready", flush=True)
        node.get()
finally:
    loop.stop()
    print("stopped", flush=True)
"""

#: The same with the loop embedded in asyncio (libchirp.asyncio): the asyncio
#: loop waits with the chirp loop's backend fd among its readers.
CTRL_C_ASYNCIO = """
import asyncio, libchirp, libchirp.asyncio
async def main():
    config = libchirp.Config()
    config.DISABLE_ENCRYPTION = True
    config.PORT = 0
    loop = libchirp.Loop()
    try:
        async with libchirp.asyncio.Chirp(loop, config, asyncio.get_running_loop()):
            print("ready", flush=True)
            await asyncio.sleep(3600)
    finally:
        loop.stop()
        print("stopped", flush=True)
asyncio.run(main())
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("program", [CTRL_C_QUEUE, CTRL_C_ASYNCIO], ids=["queue", "asyncio"])
def test_ctrl_c_ends_a_program_waiting_for_messages(program):
    # Several rounds and pauses: the interrupt lands at different points of the
    # waiting thread's drive (in the I/O poll, just after a drive returned).
    for pause in (0.2, 0.35, 0.5):
        proc = subprocess.Popen(
            [sys.executable, "-c", program], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(pause)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=10 * TIMEOUT_SCALE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert "stopped" in out and "KeyboardInterrupt" in out, out
        assert proc.returncode != 0
