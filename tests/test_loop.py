"""libchirp.Loop: life cycle, call_soon(), context manager, leak warning (docs/interfaces.md)."""

import gc
import logging
import os
import subprocess
import sys
import threading
import warnings

import pytest
from conftest import SANITIZER

import libchirp
import libchirp.queue

LIMIT = 20.0


@pytest.mark.timeout(30)
def test_start_stop_and_no_restart(bounded):
    loop = bounded(libchirp.Loop, 10, "Loop()")
    assert loop.running
    loop.run()  # no-op when started
    assert loop.running
    bounded(loop.stop, LIMIT, "Loop.stop()")
    assert not loop.running
    with pytest.raises(RuntimeError, match="Cannot restart loop"):
        loop.run()
    bounded(loop.stop, LIMIT, "second Loop.stop()")  # idempotent


@pytest.mark.timeout(30)
def test_run_loop_false(bounded):
    loop = libchirp.Loop(run_loop=False)
    assert not loop.running
    loop.run()
    assert loop.running
    bounded(loop.stop, LIMIT, "Loop.stop()")
    assert not loop.running


@pytest.mark.timeout(30)
def test_stop_without_run(bounded):
    """stop() before run() is a no-op (as in libchirp 1.x); stop() after run() is final."""
    loop = libchirp.Loop(run_loop=False)
    bounded(loop.stop, LIMIT, "Loop.stop() of a loop that never ran")
    assert not loop.running
    loop.run()
    assert loop.running
    bounded(loop.stop, LIMIT, "Loop.stop()")
    with pytest.raises(RuntimeError, match="Cannot restart loop"):
        loop.run()


@pytest.mark.timeout(30)
def test_call_soon_runs_on_the_dispatcher_thread(loop):
    done = threading.Event()
    seen = {}

    def cb(a, b=None):
        seen["args"] = (a, b)
        seen["thread"] = threading.current_thread().name
        done.set()

    loop.call_soon(cb, 1, b=2)
    assert done.wait(10)
    assert seen["args"] == (1, 2)
    assert seen["thread"] != threading.current_thread().name


@pytest.mark.timeout(30)
def test_call_soon_keeps_order_and_survives_exceptions(loop, caplog):
    order = []
    done = threading.Event()

    def boom():
        raise ValueError("boom in callback")

    with caplog.at_level(logging.ERROR, logger="libchirp"):
        for i in range(1000):
            loop.call_soon(order.append, i)
            if i == 500:
                loop.call_soon(boom)
        loop.call_soon(done.set)
        assert done.wait(10)
    assert order == list(range(1000))
    assert any("boom in callback" in (r.exc_text or "") or r.exc_info for r in caplog.records)


@pytest.mark.timeout(30)
def test_call_soon_from_many_threads(loop):
    count = []
    lock = threading.Lock()
    n_threads, per = 8, 500
    done = threading.Semaphore(0)

    def add():
        with lock:
            count.append(1)
        if len(count) == n_threads * per:
            done.release()

    def worker():
        for _ in range(per):
            loop.call_soon(add)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done.acquire(timeout=10)


@pytest.mark.timeout(30)
def test_call_soon_after_stop_raises(bounded):
    loop = libchirp.Loop()
    bounded(loop.stop, LIMIT, "Loop.stop()")
    with pytest.raises(RuntimeError):
        loop.call_soon(print, "never")


@pytest.mark.timeout(30)
def test_stop_from_a_callback_does_not_deadlock(bounded):
    loop = libchirp.Loop()
    stopped = threading.Event()

    def cb():
        loop.stop()
        stopped.set()

    loop.call_soon(cb)
    assert stopped.wait(10)
    assert not loop.running
    bounded(loop.stop, LIMIT, "Loop.stop() after a stop in a callback")


@pytest.mark.timeout(30)
def test_context_manager(bounded):
    def scenario():
        with libchirp.Loop() as loop:
            assert loop.running
        return loop

    loop = bounded(scenario, LIMIT, "with Loop()")
    assert not loop.running


@pytest.mark.timeout(60)
def test_stop_with_open_node_ends_in_the_node_stop(bounded, free_port):
    loop = libchirp.Loop()
    cfg = libchirp.Config()
    cfg.DISABLE_ENCRYPTION = True
    cfg.PORT = free_port
    node = bounded(libchirp.queue.Chirp, 30, "node start", loop, cfg)
    bounded(loop.stop, LIMIT, "Loop.stop() with a node open")
    assert not loop.running
    # The loop still serves the node until it stops.
    done = threading.Event()
    loop.call_soon(done.set)
    assert done.wait(10)
    with pytest.raises(RuntimeError):
        cfg2 = libchirp.Config()
        cfg2.DISABLE_ENCRYPTION = True
        libchirp.queue.Chirp(loop, cfg2)
    bounded(node.stop, LIMIT, "node.stop()")
    with pytest.raises(RuntimeError):  # the loop has ended with its last node
        loop.call_soon(print, "never")


@pytest.mark.timeout(60)
def test_node_needs_a_running_loop(bounded, free_port):
    loop = libchirp.Loop(run_loop=False)
    cfg = libchirp.Config()
    cfg.DISABLE_ENCRYPTION = True
    cfg.PORT = free_port
    with pytest.raises(RuntimeError, match="not running"):
        libchirp.queue.Chirp(loop, cfg)
    assert not cfg.sealed, "a node that did not start must not seal the config"
    bounded(loop.stop, LIMIT, "Loop.stop()")


@pytest.mark.timeout(60)
def test_node_start_and_stop_on_the_dispatcher_are_refused(loop, make_node, free_port):
    node = make_node()
    box = {}
    done = threading.Event()

    def cb():
        cfg = libchirp.Config()
        cfg.DISABLE_ENCRYPTION = True
        cfg.PORT = free_port
        for what, func in (("start", lambda: libchirp.queue.Chirp(loop, cfg)), ("stop", node.stop)):
            try:
                func()
            except RuntimeError as exc:
                box[what] = exc
        done.set()

    loop.call_soon(cb)
    assert done.wait(20)
    assert "dispatcher" in str(box["start"])
    assert "dispatcher" in str(box["stop"])


@pytest.mark.timeout(30)
def test_leaked_running_loop_warns():
    loop = libchirp.Loop()
    core = loop._core
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del loop
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    core.bg_thread.join(10)
    assert not core.bg_thread.is_alive(), "the leaked loop was not stopped"
    assert core.c is None, "the leaked loop was not freed"


@pytest.mark.timeout(60)
def test_leaked_node_warns_and_stops(loop, free_port):
    cfg = libchirp.Config()
    cfg.DISABLE_ENCRYPTION = True
    cfg.PORT = free_port
    node = libchirp.queue.Chirp(loop, cfg)
    core = node._node
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del node
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    for _ in range(1000):
        if core.done:
            break
        threading.Event().wait(0.01)
    assert core.done and core.c is None, "the leaked node was not stopped and freed"
    assert core.token not in loop._core.nodes


@pytest.mark.timeout(30)
def test_core_log_lines_reach_the_logger(make_node, caplog):
    with caplog.at_level(logging.DEBUG, logger="libchirp"):
        a = make_node()
        b = make_node()
        fut = a.send(make_node.message(b, data=b"x"))
        b.get(timeout=10)
        fut.result(timeout=10)
    assert any(r.name == "libchirp" for r in caplog.records)


def test_compiled_core_matches_the_python_code():
    from libchirp import _core

    assert _core.lib.ch_version_stamp() == _core._EXPECTED_STAMP
    assert _core.lib.CH_VERSION_STAMP == _core._EXPECTED_STAMP


#: Allocates and frees two blocks of SIZE bytes 200 times after making a Loop and
#: prints the page faults per round (glibc returning and re-faulting the memory).
MALLOC_ROUNDS = """
import ctypes, resource, sys
import libchirp
loop = libchirp.Loop()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    a, b = libc.malloc(size), libc.malloc(size)
    ctypes.memset(a, 1, size)
    ctypes.memset(b, 1, size)
    libc.free(b)
    libc.free(a)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
loop.stop()
"""


@pytest.mark.skipif(SANITIZER != "", reason="the sanitizers' allocators ignore mallopt()")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt()")
def test_large_blocks_are_reused_not_faulted_in_again():
    """A Loop raises glibc's trim and mmap thresholds (csrc/loop.c), so blocks of
    large messages freed and allocated again are not given back to the system
    and faulted in page by page each time; LIBCHIRP_MALLOC_TUNING=0 keeps glibc's
    defaults (and shows the difference)."""

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}

    def faults(**env):
        out = subprocess.run(
            [sys.executable, "-c", MALLOC_ROUNDS, str(300_000)],
            env=dict(base, **env), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    tuned, default = faults(), faults(LIBCHIRP_MALLOC_TUNING="0")
    assert default > 20, (
        "glibc's defaults did not fault (%.1f per round): test says nothing" % default
    )
    assert tuned < 5, "%.1f page faults per round with the tuning (%.1f without)" % (tuned, default)
