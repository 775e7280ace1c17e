"""Process targets for tests/test_mp*.py (importable by spawned children).

Producers put ``(producer, seq)`` tuples; consumers take until they get
``None`` and report what they got. A consumer checks on its own that the items
of each producer came in increasing order (a consumer sees a subsequence of
each producer's stream, which must keep the producer's order).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

from libchirp import mp


def produce(q: mp.Queue, producer: int, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        q.put((producer, i))
    q.join_thread()
    q.close()


def consume(q: mp.Queue, out: Any, name: str, batch: int = 1, delay: float = 0.0) -> None:
    """Take items until None; report (name, items, order_ok) through ``out``."""
    got: List[Tuple[int, int]] = []
    last: Dict[int, int] = {}
    order_ok = True
    done = False
    while not done:
        items = q.get_many(batch, timeout=60) if batch > 1 else [q.get(timeout=60)]
        for item in items:
            if item is None:
                done = True
                # anything after the sentinel in this batch goes back
                rest = items[items.index(None) + 1 :]
                for r in rest:
                    q.put(r)
                break
            p, i = item
            if last.get(p, -1) >= i:
                order_ok = False
            last[p] = i
            got.append(item)
            if delay:
                time.sleep(delay)
    q.close()
    out.put((name, got, order_ok))


def record(q: mp.Queue, path: str, delay: float) -> None:
    """Take items for ever, appending each to ``path`` right after get() returned."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while True:
        item = q.get(timeout=60)
        if item is None:
            os.write(fd, b"END\n")
            break
        os.write(fd, b"%d %d\n" % item)
        if delay:
            time.sleep(delay)
    os.close(fd)
    q.close()


def echo(conn: mp.Connection, n: int) -> None:
    """Answer n objects, then start n exchanges of its own, then close."""
    for _ in range(n):
        obj = conn.recv()
        conn.send({"echo": obj})
    for i in range(n):
        conn.send({"ask": i})
        answer = conn.recv()
        assert answer == {"answer": i}, answer
    data = conn.recv_bytes()
    conn.send_bytes(data[::-1])
    conn.close()


def use_queue_from_pipe(conn: mp.Connection, n: int) -> None:
    """Receive a queue through a pipe, put n items into it; send a pipe end back through it."""
    q: mp.Queue = conn.recv()
    for i in range(n):
        q.put(i)
    a, b = mp.Pipe()
    q.put(b)
    q.join_thread()
    a.send("through a pipe sent through a queue")
    assert a.recv() == "thanks"
    conn.close()
    a.close()
    q.close()


def get_with_timeout(q: mp.Queue, out: Any, timeout: float) -> None:
    t = time.monotonic()
    try:
        q.get(timeout=timeout)
        out.put(("item", time.monotonic() - t))
    except mp.Empty:
        out.put(("empty", time.monotonic() - t))
    q.close()


def put_full(q: mp.Queue, out: Any, n: int, timeout: float) -> None:
    """Put until Full; report how many went in and how long the last put waited."""
    t = time.monotonic()
    k: Optional[int] = None
    for i in range(n):
        t = time.monotonic()
        try:
            q.put(i, timeout=timeout)
        except mp.Full:
            k = i
            break
    out.put((k, time.monotonic() - t))
    q.cancel_join_thread()


def take(q: mp.Queue, out: Any, n: int) -> None:
    """Get n items one by one and report them, in the order got, through ``out``."""
    got = [q.get(timeout=30) for _ in range(n)]
    q.close()
    out.put(got)


def take_one_and_wait(q: mp.Queue, out: Any) -> None:
    """Get one item, report it, then hold whatever else arrives until killed."""
    out.put(q.get(timeout=30))
    out.join_thread()
    time.sleep(60)


def take_and_hold(q: mp.Queue, out: Any, n: int, close: bool, lease_dir: str = "") -> None:
    """Get n items one by one; report them, the items leased ahead (held in the
    inbox, not handed out) and the lease files; close the queue first if
    ``close``; then wait to be killed. ``lease_dir`` moves this process's lease
    files where the host does not look."""
    from libchirp.mp import lease

    if lease_dir:
        lease.LEASE_DIR = lease_dir
    got = [q.get(timeout=30) for _ in range(n)]
    ep = q._ep(q._qid)
    rt = ep.rt  # type: ignore[union-attr]
    held = sum(len(e.items) - e.pos for e in rt.inbox.get(q._qid, ()))
    paths = [lf.path for lf in rt.leases.values() if lf is not None]
    if close:
        q.close()
    out.put((got, held, paths))
    out.join_thread()
    time.sleep(60)


def count_give_backs(ep: Any) -> List[int]:
    """From now on, note how many items the client runtime of ``ep`` gives back
    to its host each time (the list returned)."""
    rt = ep.rt
    returned: List[int] = []
    give_back = rt.give_back

    def counting(key: Any, qid: int, items: Any, entries: Any) -> None:
        returned.append(sum(len(e.items) - e.pos for e in entries) + len(items))
        give_back(key, qid, items, entries)

    rt.give_back = counting
    return returned


def take_slowly_after_a_while(q: mp.Queue, out: Any, n: int, first: int, pause: float) -> None:
    """With mp.TIMEOUT of 2 s: get ``first`` items, pause past TIMEOUT/2 (the
    items held ahead are then given back), then get the rest; report all of
    them and how many items were given back."""
    got = [q.get(timeout=30) for _ in range(first)]
    returned = count_give_backs(q._ep(q._qid))
    time.sleep(pause)
    got += [q.get(timeout=30) for _ in range(n - first)]
    q.close()
    out.put((got, returned))


def echo_once_then_close(conn: mp.Connection, out: Any, pause: float) -> None:
    """Receive one object, send it back, wait a little (the other end sends
    again meanwhile) and close, without receiving any more; report how many
    items the close gave back."""
    conn.send(conn.recv())
    returned = count_give_backs(conn._ep(conn._rq))
    time.sleep(pause)
    conn.close()
    out.put(("closed", sum(returned)))
    out.join_thread()


def receive(conn: mp.Connection, out: Any, n: int) -> None:
    """Receive n objects and report them through ``out``."""
    got = [conn.recv() for _ in range(n)]
    conn.close()
    out.put(got)


def recv_and_hold(conn: mp.Connection, out: Any, n: int, close: bool, lease_dir: str = "") -> None:
    """Receive n objects; report them, how many items were pushed to this end
    and not yet received (held in the inbox) and whether the host pushes to it;
    close the end first if ``close``; then wait to be killed. ``lease_dir``
    moves this process's lease files where the host does not look."""
    from libchirp.mp import lease

    if lease_dir:
        lease.LEASE_DIR = lease_dir
    got = [conn.recv() for _ in range(n)]
    ep = conn._ep(conn._rq)
    rt = ep.rt  # type: ignore[union-attr]
    held = sum(len(e.items) - e.pos for e in rt.inbox.get(conn._rq, ()))
    piped = bool(ep.piped)  # type: ignore[union-attr]
    if close:
        conn.close()
    out.put((got, held, piped))
    out.join_thread()
    time.sleep(60)


def drain(conn: mp.Connection, out: Any) -> None:
    """Receive until EOFError; report what came and poll() after it."""
    got = []
    while True:
        try:
            got.append(conn.recv())
        except EOFError:
            break
    out.put((got, conn.poll(0)))
    out.join_thread()


def produce_big(q: mp.Queue, n: int, size: int, consumers: int) -> None:
    """Put n items (i, payload) whose payload tells i; then a None per consumer."""
    for i in range(n):
        q.put((i, bytes([i % 251]) * size))
    for _ in range(consumers):
        q.put(None)
    q.join_thread()


def consume_big(q: mp.Queue, out: Any) -> None:
    """Get until None; report the indices in the order got and whether every
    payload was intact."""
    seen: List[int] = []
    intact = True
    while (item := q.get(timeout=60)) is not None:
        i, payload = item
        intact = intact and payload == bytes([i % 251]) * len(payload)
        seen.append(i)
    out.put((seen, intact))
    out.join_thread()
