"""The ``chirp`` command: talk to chirp nodes from a shell.

Theory of operation
-------------------
Every subcommand is a short program over the public API (``Loop``,
``queue.Chirp``, ``Message``, ``request()``, ``statistics()``)::

    chirp listen [--port P] [--echo] [--count N] ...   print what arrives (stdout)
    chirp send ADDR:PORT DATA [--count N] ...          send, print each result
    chirp stats ADDR:PORT                              ask a `listen --serve-stats` node
    chirp bench [--count N] [--size B]                 two local nodes, a table of rates
    chirp pki ca|node|dh ...                           certificates (libchirp.pki)

Output rules: stdout carries the data a command produces (received messages,
send results, the bench table, statistics); notes, progress and errors go to
stderr. Every user error is one line ``chirp CMD: error: ...`` on stderr with a
non-zero exit status: 2 for bad arguments, 1 when the command failed (a send
failed, the port is in use, ...). Ctrl-C ends ``listen`` normally (status 0)
and any other command with status 130.

Encryption: with ``--cert FILE --dh FILE`` a node uses TLS towards every peer
except 127.0.0.1 and ::1 (which chirp never encrypts). Without them the node
runs with ``DISABLE_ENCRYPTION`` and says so once on stderr, unless the note
is pointless (all peers on loopback) or ``--plaintext`` asked for it.

Statistics of a running node: ``chirp listen --stats-every S`` prints its own
``statistics()`` to stderr every S seconds; ``chirp listen --serve-stats``
additionally answers a message with the header ``chirp.stats?`` by sending it
back with the header ``chirp.stats`` and the statistics as JSON, which is what
``chirp stats ADDR:PORT`` asks for and prints.

``chirp bench`` starts its peer node in a child process (``python -m libchirp
_bench-peer``, an internal command) and drives it from this process.

Every blocking wait here is bounded, so the command never hangs on a future.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as _wait_futures
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

from . import __version__
from .config import LIMITS as CONFIG_LIMITS
from .config import Config
from .errors import ERROR_NAMES, ChirpError
from .loop import Loop
from .message import MessageBase
from .queue import Chirp, Message

__all__ = ["main", "parse_address", "format_address", "STATS_REQUEST", "STATS_REPLY"]

PROG = "chirp"
#: Header of a statistics request (``chirp stats``) and of its answer.
STATS_REQUEST = b"chirp.stats?"
STATS_REPLY = b"chirp.stats"
#: The internal command that runs the peer node of ``chirp bench``.
BENCH_PEER = "_bench-peer"
#: Upper bound (s) for a future that should complete within the node's timeouts.
_SLACK = 60.0


class CliError(Exception):
    """A failure to report as one line on stderr (exit status 1)."""


class UsageError(CliError):
    """Bad arguments found after parsing (options that exclude each other): status 2."""


def _config_limit(field: str, note: str) -> Tuple[str, float, float, str]:
    """The range of a Config field as libchirp.config.LIMITS has it (0 where 0 is allowed)."""
    lim = CONFIG_LIMITS[field]
    assert lim.low is not None and lim.high is not None
    return (field, 0 if lim.zero is not None else lim.low, lim.high, note)


#: The limits the command checks its node options against, shown by ``chirp --help``:
#: option -> (Config field or "", low, high, unit). Where a Config field is named,
#: the range is that field's in libchirp.config.LIMITS, the one table of them.
LIMITS: Dict[str, Tuple[str, float, float, str]] = {
    "--port": ("PORT", CONFIG_LIMITS["PORT"].low or 0, CONFIG_LIMITS["PORT"].high or 0,
               "or 0: a free port, which the command prints"),
    "--timeout": _config_limit("TIMEOUT", "seconds"),
    "--max-slots": _config_limit("MAX_SLOTS", "0 = the mode's default"),
    "--stats-every": ("", 0.1, 86400.0, "seconds"),
    "--interval": ("", 0.0, 86400.0, "seconds"),
}  # fmt: skip


def _mark_done(done_at: Dict[int, float], index: int, _future: Any) -> None:
    """Done callback: note when send number ``index`` completed."""
    done_at[index] = time.monotonic()


def _limits_text() -> str:
    lines = ["limits of the node options:"]
    for option, (field, low, high, note) in LIMITS.items():
        name = "%s (Config.%s)" % (option, field) if field else option
        lines.append("  %-32s %g..%g, %s" % (name, low, high, note))
    return "\n".join(lines)


def plural(count: int, word: str, many: Optional[str] = None) -> str:
    """``"1 message"``, ``"2 messages"`` (``many`` for irregular plurals)."""
    return "%d %s" % (count, word if count == 1 else (many or word + "s"))


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


# -- small helpers ---------------------------------------------------------------------------------

_out_lock = threading.Lock()


def _out(line: str) -> None:
    """Print one line of data to stdout, flushed (callable from any thread)."""
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _out_raw(data: bytes) -> None:
    """Write bytes to stdout as they are, then a newline, flushed."""
    with _out_lock:
        sys.stdout.flush()
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.buffer.flush()


def _err(line: str) -> None:
    """Print one line to stderr (notes, progress, summaries)."""
    with _out_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def format_address(address: str, port: int) -> str:
    """``"127.0.0.1:2998"`` or ``"[::1]:2998"``."""
    if ":" in address:
        return "[%s]:%d" % (address, port)
    return "%s:%d" % (address, port)


def parse_address(text: str) -> Tuple[str, int]:
    """Parse ``ADDRESS:PORT`` (IPv6 as ``[ADDRESS]:PORT``); ``ValueError`` with the reason.

    Only IP literals are accepted, as chirp does not resolve host names.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("%r: write an IPv6 address as [ADDRESS]:PORT, e.g. [::1]:2998" % text)
        port_text = rest[1:]
        families = [socket.AF_INET6]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("%r: expected ADDRESS:PORT, e.g. 127.0.0.1:2998" % text)
        if ":" in host:
            raise ValueError("%r: write an IPv6 address in brackets, e.g. [::1]:2998" % text)
        families = [socket.AF_INET]
    canonical = None
    for family in families:
        try:
            canonical = socket.inet_ntop(family, socket.inet_pton(family, host))
        except (OSError, ValueError):
            pass
    if canonical is None:
        raise ValueError(
            "%r: %r is not an IP address (chirp does not resolve host names)" % (text, host)
        )
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError("%r: the port %r is not a number" % (text, port_text)) from None
    if not 1 <= port <= 65535:
        raise ValueError("%r: the port must be 1..65535" % text)
    return canonical, port


def _address_arg(text: str) -> Tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ip_arg(text: str) -> str:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, text))
        except (OSError, ValueError):
            pass
    raise argparse.ArgumentTypeError("%r is not an IPv4 or IPv6 address" % text)


def _int_arg(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
        if value < low or (high is not None and value > high):
            limits = "at least %d" % low if high is None else "%d..%d" % (low, high)
            raise argparse.ArgumentTypeError("must be %s: %s" % (limits, text))
        return value

    return convert


def _port_arg(text: str) -> int:
    """A listening port: 0 (a free one) or in the range of LIMITS["--port"]."""
    low, high = (int(x) for x in LIMITS["--port"][1:3])
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
    if value != 0 and not low <= value <= high:
        raise argparse.ArgumentTypeError(
            "must be 0 (a free port) or %d..%d: %s" % (low, high, text)
        )
    return value


def _float_arg(low: float, high: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not a number: %r" % text) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("must be %g..%g: %s" % (low, high, text))
        return value

    return convert


def _is_loopback(address: str) -> bool:
    # Exactly the two addresses chirp never encrypts (docs/tls.md).
    return address in ("127.0.0.1", "::1")


def _show_bytes(value: bytes, limit: int, fmt: str = "repr") -> str:
    shown = value[:limit] if limit and len(value) > limit else value
    text = shown.hex() if fmt == "hex" else repr(shown)
    if len(shown) < len(value):
        text += "...(%d bytes)" % len(value)
    return text


#: The forms of ``chirp listen --format``.
FORMATS = ("repr", "hex", "raw")


def describe(msg: MessageBase, limit: int = 0, verbose: bool = False, fmt: str = "repr") -> str:
    """One line for a message: ``ADDR:PORT header=b'..' data=b'..'``.

    ``fmt`` is ``"repr"`` (bytes literals, escaped) or ``"hex"`` (hex digits).
    """
    line = "%s header=%s data=%s" % (
        format_address(msg.address, msg.port),
        _show_bytes(msg.header, limit, fmt),
        _show_bytes(msg.data, limit, fmt),
    )
    if verbose:
        line += " identity=%s serial=%d remote=%s" % (
            msg.identity.hex(),
            msg.serial,
            msg.remote_identity.hex(),
        )
    return line


def _exc_text(exc: BaseException) -> str:
    name = ERROR_NAMES.get(getattr(exc, "ecode", None) or -1)
    text = "%s: %s" % (type(exc).__name__, exc)
    if name and name not in str(exc):
        text += " (%s)" % name
    return text


def _wait(
    fut: Future[Any], limit: float, what: str, stop: Optional[threading.Event] = None
) -> bool:
    """Wait until ``fut`` is done; False if ``stop`` was set first (Ctrl-C).

    A future that outlives ``limit`` is a bug, reported as an error.
    """
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CliError("%s did not complete within %.0f s" % (what, limit))
        # Short slices when interruptible: a signal handler only sets ``stop``.
        done, _ = _wait_futures([fut], timeout=min(left, 0.05) if stop else left)
        if done:
            return True
        if stop is not None and stop.is_set():
            return False


# -- nodes -----------------------------------------------------------------------------------------


def _add_node_options(
    p: argparse.ArgumentParser, port_help: str, default_port: Optional[int]
) -> None:
    g = p.add_argument_group("node")
    g.add_argument(
        "--port", type=_port_arg, default=default_port, metavar="P",
        help=port_help + "; 0: a free one, printed on stderr",
    )  # fmt: skip
    g.add_argument(
        "--bind",
        action="append",
        type=_ip_arg,
        metavar="ADDR",
        help="listen on this IPv4 or IPv6 address only (once per family; "
        "default: all addresses of both families)",
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--sync",
        dest="asynchronous",
        action="store_false",
        default=False,
        help="synchronous mode (the default): a send completes when the "
        "receiver released the message",
    )
    mode.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="asynchronous mode: a send completes when it is written",
    )
    g.add_argument(
        "--timeout",
        type=_float_arg(*LIMITS["--timeout"][1:3]),
        default=5.0,
        metavar="T",
        help="Config.TIMEOUT in seconds (default: %(default)s)",
    )
    t = p.add_argument_group(
        "encryption",
        "Without --cert/--dh the node runs with DISABLE_ENCRYPTION (plain TCP) and says so\n"
        "once; remote peers must then disable encryption too. 127.0.0.1 and ::1 are never\n"
        "encrypted.",
    )
    t.add_argument(
        "--cert",
        metavar="FILE",
        help="CERT_CHAIN_PEM: key, certificate and CA (from 'chirp pki node')",
    )
    t.add_argument("--dh", metavar="FILE", help="DH_PARAMS_PEM (from 'chirp pki dh')")
    t.add_argument(
        "--plaintext", action="store_true", help="no TLS (DISABLE_ENCRYPTION), without the note"
    )


def _make_config(args: argparse.Namespace, note: Optional[str]) -> Config:
    """A Config from the common options; prints the plaintext note once if ``note``."""
    config = Config()
    config.PORT = args.port or 0
    config.SYNCHRONOUS = not args.asynchronous
    config.TIMEOUT = args.timeout
    binds = args.bind or []
    if sum(":" in a for a in binds) > 1 or sum(":" not in a for a in binds) > 1:
        raise UsageError("--bind takes at most one IPv4 and one IPv6 address")
    for address in binds:
        if ":" in address:
            config.BIND_V6 = address
        else:
            config.BIND_V4 = address
    if args.plaintext and (args.cert or args.dh):
        raise UsageError("--plaintext and --cert/--dh exclude each other")
    if bool(args.cert) != bool(args.dh):
        raise UsageError("--cert and --dh go together (TLS needs both files)")
    if args.cert:
        for option, path in (("--cert", args.cert), ("--dh", args.dh)):
            if not os.path.isfile(path):
                raise CliError("%s %s: no such file" % (option, path))
        config.CERT_CHAIN_PEM = os.path.abspath(args.cert)
        config.DH_PARAMS_PEM = os.path.abspath(args.dh)
    else:
        config.DISABLE_ENCRYPTION = True
        if note and not args.plaintext:
            _err("%s: note: %s" % (args.prog, note))
    return config


def _start_node(loop: Loop, config: Config) -> Chirp:
    """Start a node with ``config`` (PORT 0: the node picks a free port)."""
    try:
        return Chirp(loop, config)
    except OSError as exc:
        text = exc.strerror or str(exc)
        if "in use" in text:
            raise CliError("%s (choose another with --port, or --port 0)" % text) from None
        raise CliError("the node did not start: %s" % text) from None
    except ChirpError as exc:
        raise CliError("the node did not start: %s" % exc) from None


def _announce(prog: str, node: Chirp, args: argparse.Namespace) -> None:
    """Say where a sending node listens when the user chose it (--port/--bind)."""
    if args.port is not None or args.bind:
        config = node.config
        _err(
            "%s: this node listens on port %d (IPv4 %s, IPv6 %s)"
            % (prog, node.port, config.BIND_V4, config.BIND_V6)
        )


def _stop_node(node: Chirp, prog: str) -> None:
    try:
        node.stop()
    except RuntimeError as exc:  # messages were not released (cannot happen here; report it)
        _err("%s: warning: %s" % (prog, exc))


class _Stopper:
    """SIGTERM/SIGINT end a command gracefully: ``event`` is set, nothing is raised."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.event.set()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


# -- statistics ------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    raise AssertionError("unreachable")


def _count(value: Any, word: str, many: Optional[str] = None) -> str:
    """:func:`plural` for a statistics field that may be missing (``"?"``)."""
    if not isinstance(value, int):
        return "? %s" % (many or word + "s")
    return plural(value, word, many)


_REMOTE_HEAD = (
    "remote", "conns", "slots", "queue", "flight", "idle s", "msgs in", "bytes in",
    "msgs out", "bytes out", "fail", "tmo", "proto", "tls",
)  # fmt: skip
_COUNTERS = (
    "messages_in", "bytes_in", "messages_out", "bytes_out", "send_failures", "timeouts",
    "protocol_errors", "tls_errors",
)  # fmt: skip


def _node_line(stats: Dict[str, Any]) -> str:
    return "node %s port %s: %s, %s, %s, %s, %s, %s" % (
        stats.get("identity", "?"),
        stats.get("port", "?"),
        _count(stats.get("connections"), "connection"),
        _count(len(stats.get("remotes", {})), "remote"),
        _count(stats.get("pending_sends"), "pending send"),
        _count(stats.get("pending_requests"), "pending request"),
        _count(stats.get("held_messages"), "held message"),
        _count(stats.get("late_replies"), "late reply", "late replies"),
    )


def _totals_line(stats: Dict[str, Any]) -> str:
    t = stats.get("totals", {})
    return "totals: in %s (%s), out %s (%s), %s, %s, %s, %s, %s" % (
        _count(t.get("messages_in"), "msg"),
        _size(t.get("bytes_in", 0)),
        _count(t.get("messages_out"), "msg"),
        _size(t.get("bytes_out", 0)),
        _count(t.get("send_failures"), "send failure"),
        _count(t.get("timeouts"), "timeout"),
        _count(t.get("protocol_errors"), "protocol error"),
        _count(t.get("tls_errors"), "TLS error"),
        _count(t.get("connects"), "connect"),
    )


def _remote_row(key: str, r: Dict[str, Any]) -> Tuple[str, ...]:
    c = r.get("counters", {})
    return (
        key,
        str(r.get("connections", "")),
        str(r.get("slots_in_use", "")),
        str(r.get("send_queue", "")),
        str(r.get("in_flight", "")),
        "%.1f" % r.get("idle", 0.0),
    ) + tuple(str(c.get(name, "")) for name in _COUNTERS)


def format_stats(stats: Dict[str, Any], previous: Optional[Dict[str, Any]] = None) -> List[str]:
    """Lines of text for a ``statistics()`` snapshot (see :mod:`libchirp.stats`).

    With ``previous`` (an earlier snapshot) only what changed since: the node
    line, the totals line and the rows of the remotes whose figures changed (the
    idle time aside, which always does); nothing at all if nothing changed.
    """
    lines = []
    node, totals = _node_line(stats), _totals_line(stats)
    if previous is None or node != _node_line(previous):
        lines.append(node)
    if previous is None or totals != _totals_line(previous):
        lines.append(totals)
    remotes = stats.get("remotes", {})
    before = {} if previous is None else previous.get("remotes", {})
    rows: List[Tuple[str, ...]] = [_REMOTE_HEAD]
    for key in sorted(remotes):
        row = _remote_row(key, remotes[key])
        if previous is not None and key in before:
            old = _remote_row(key, before[key])
            if row[:5] + row[6:] == old[:5] + old[6:]:
                continue
        rows.append(row)
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(_REMOTE_HEAD))]
        for row in rows:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
    return lines


def _statistics(node: Chirp) -> Dict[str, Any]:
    get = getattr(node, "statistics", None)
    if get is None:
        raise CliError("this libchirp has no node statistics")
    return dict(get())


# -- chirp listen ----------------------------------------------------------------------------------


def cmd_listen(args: argparse.Namespace) -> int:
    prog = args.prog
    note = (
        "no --cert/--dh given: TLS is off (DISABLE_ENCRYPTION), so remote peers must disable "
        "it too; 127.0.0.1 and ::1 are plain TCP anyway (--plaintext hides this note)"
    )
    config = _make_config(args, note)
    config.AUTO_RELEASE = False  # released after printing: a sync sender waits for that
    if args.max_slots:
        config.MAX_SLOTS = args.max_slots
    received = echoed = echo_failures = 0
    pending: collections.deque[Any] = collections.deque()
    wait_limit = 3 * args.timeout + _SLACK

    def echo_done(fut: Future[Any]) -> None:
        nonlocal echo_failures
        exc = fut.exception()
        if exc is not None:
            echo_failures += 1
            _err("%s: sending back failed: %s" % (prog, _exc_text(exc)))

    def show(msg: MessageBase) -> None:
        if args.format == "raw":
            _out_raw(msg.data)
        else:
            _out(describe(msg, args.max_bytes, args.verbose, args.format))

    with _Stopper() as stopper, Loop() as loop:
        node = _start_node(loop, config)
        try:
            config = node.config
            mode = "synchronous" if config.SYNCHRONOUS else "asynchronous"
            tls = "plaintext" if config.DISABLE_ENCRYPTION else "TLS"
            _err(
                "%s: listening on port %d (IPv4 %s, IPv6 %s), %s, %s; Ctrl-C stops"
                % (prog, node.port, config.BIND_V4, config.BIND_V6, mode, tls)
            )
            next_stats = time.monotonic() + args.stats_every if args.stats_every else None
            shown: Optional[Dict[str, Any]] = None  # the statistics printed last
            while not stopper.stopped and not (args.count and received >= args.count):
                if next_stats is not None and time.monotonic() >= next_stats:
                    next_stats += args.stats_every
                    current = _statistics(node)
                    for line in format_stats(current, shown):
                        _err("%s: stats: %s" % (prog, line))
                    shown = current
                try:
                    msg = node.get(timeout=0.2)
                except queue.Empty:
                    continue
                # Each message is released before it is answered, so the node never
                # holds one while waiting for an answer to go out.
                if args.serve_stats and msg.header == STATS_REQUEST:
                    msg.release_slot()
                    msg.header = STATS_REPLY
                    msg.data = json.dumps(_statistics(node), sort_keys=True).encode()
                else:
                    received += 1
                    show(msg)
                    msg.release_slot()
                    if not args.echo:
                        continue
                    echoed += 1
                fut = node.send(msg)
                fut.add_done_callback(echo_done)
                pending.append(fut)
                while pending and pending[0].done():
                    pending.popleft()
            # Let the echoes go out before the node stops.
            for fut in pending:
                _wait(fut, wait_limit, "an echo")
            if args.stats_every:
                for line in format_stats(_statistics(node)):
                    _err("%s: stats: %s" % (prog, line))
        finally:
            # Messages beyond --count (or after Ctrl-C) are released unprinted, so
            # stop() need not wait for them.
            node.disable_queue = True
            while True:
                try:
                    node.get_nowait().release_slot()
                except queue.Empty:
                    break
            _stop_node(node, prog)
    summary = "%s: %s received" % (prog, plural(received, "message"))
    if args.echo:
        summary += ", %d echoed, %s failed" % (echoed, plural(echo_failures, "echo", "echoes"))
    _err(summary)
    return 0


# -- chirp send ------------------------------------------------------------------------------------


def _stdin_lines(stop: threading.Event) -> "queue.Queue[Optional[bytes]]":
    """Lines of stdin (without the newline) in a queue, None at the end.

    A thread reads them, so waiting for the next line never delays Ctrl-C.
    """
    lines: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=1024)

    def read() -> None:
        try:
            for line in sys.stdin.buffer:
                if stop.is_set():
                    break
                lines.put(line[:-1] if line.endswith(b"\n") else line)
        finally:
            lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _payloads(args: argparse.Namespace, stop: threading.Event) -> Iterator[Optional[bytes]]:
    """The data of each message to send; None while waiting for a line of stdin."""
    if args.lines:
        lines = _stdin_lines(stop)
        sent = 0
        while args.count is None or sent < args.count:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                yield None  # lets the caller look at Ctrl-C
                continue
            if line is None:
                return
            sent += 1
            yield line
        return
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                template = f.read()
        except OSError as exc:
            raise CliError("--file %s: %s" % (args.file, exc.strerror or exc)) from None
        numbered = False
    elif args.data == "-":
        template = sys.stdin.buffer.read()
        numbered = b"{n}" in template
    else:
        template = args.data.encode("utf-8")
        numbered = b"{n}" in template
    for i in range(args.count or 1):
        yield template.replace(b"{n}", b"%d" % i) if numbered else template


def cmd_send(args: argparse.Namespace) -> int:
    prog = args.prog
    address, port = args.address
    target = format_address(address, port)
    sources = [args.data is not None, args.file is not None, args.lines]
    if sum(sources) != 1:
        raise UsageError("give exactly one of DATA, --file FILE or --lines")
    total = None if args.lines else (args.count or 1)
    header = args.header.encode("utf-8")
    note = None
    if not _is_loopback(address):
        note = (
            "no --cert/--dh given: sending without TLS (DISABLE_ENCRYPTION), so %s must "
            "disable encryption too (--plaintext hides this note)" % target
        )
    config = _make_config(args, note)
    what = "request" if args.request else "send"
    ok = failed = sent = 0
    wait_limit = 3 * args.timeout + _SLACK
    interrupted = False
    with _Stopper() as stopper, Loop() as loop:
        node = _start_node(loop, config)
        node.disable_queue = True  # stray messages (e.g. echoes when not --request) are dropped
        try:
            _announce(prog, node, args)
            pending: collections.deque[Any] = collections.deque()
            done_at: Dict[int, float] = {}

            def finish(item: Tuple[int, float, Future[Any]]) -> bool:
                """Report one send; False if Ctrl-C came first."""
                nonlocal ok, failed
                i, start, fut = item
                if not _wait(fut, wait_limit, "%s %d" % (what, i + 1), stopper.event):
                    return False
                took = (done_at.get(i, time.monotonic()) - start) * 1000.0
                exc = fut.exception()
                n = "%d/%d" % (i + 1, total) if total else "%d" % (i + 1)
                if exc is not None:
                    failed += 1
                    _out("FAILED %s to %s after %.1f ms: %s" % (n, target, took, _exc_text(exc)))
                elif args.request:
                    ok += 1
                    reply = fut.result()
                    _out("reply %s in %.1f ms: %s" % (n, took, describe(reply, args.max_bytes)))
                else:
                    ok += 1
                    _out("sent %s to %s in %.1f ms" % (n, target, took))
                return True

            began = time.monotonic()
            for data in _payloads(args, stopper.event):
                if stopper.stopped:
                    break
                if data is None:
                    continue
                if args.interval and sent:
                    # A steady rate: send i starts at began + i * interval.
                    if stopper.event.wait(
                        max(0.0, began + sent * args.interval - time.monotonic())
                    ):
                        break
                msg = Message()
                msg.address = address
                msg.port = port
                msg.header = header
                msg.data = data
                start = time.monotonic()
                fut = node.request(msg) if args.request else node.send(msg)
                fut.add_done_callback(functools.partial(_mark_done, done_at, sent))
                pending.append((sent, start, fut))
                sent += 1
                while len(pending) >= args.window or (pending and pending[0][2].done()):
                    if not finish(pending.popleft()):
                        break
                if stopper.stopped:
                    break
            while pending and not stopper.stopped:
                if not finish(pending.popleft()):
                    break
            interrupted = stopper.stopped
        finally:
            # Unfinished sends (after Ctrl-C) fail here at once: stop() does not wait.
            _stop_node(node, prog)
    if sent > 1 or failed or interrupted or args.lines:
        _err(
            "%s: %d of %s to %s succeeded, %d failed"
            % (prog, ok, plural(sent, what), target, failed)
        )
    if interrupted:
        _err("%s: interrupted, %s unfinished" % (prog, plural(sent - ok - failed, what)))
        return 130
    return 1 if failed else 0


# -- chirp stats -----------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    prog = args.prog
    address, port = args.address
    target = format_address(address, port)
    note = None
    if not _is_loopback(address):
        note = "no --cert/--dh given: asking without TLS (DISABLE_ENCRYPTION)"
    config = _make_config(args, note)
    with Loop() as loop:
        node = _start_node(loop, config)
        node.disable_queue = True
        try:
            _announce(prog, node, args)
            msg = Message()
            msg.address = address
            msg.port = port
            msg.header = STATS_REQUEST
            fut = node.request(msg)
            _wait(fut, 3 * args.timeout + _SLACK, "the statistics request")
            exc = fut.exception()
            try:
                fut.send_result(timeout=0)  # raises unless the request itself got there
                delivered = True
            except Exception:
                delivered = False
            if delivered and isinstance(exc, TimeoutError):
                raise CliError(
                    "%s did not answer within %g s; is it a 'chirp listen --serve-stats' node?"
                    % (target, args.timeout)
                )
            if exc is not None:
                raise CliError("asking %s failed: %s" % (target, _exc_text(exc)))
            reply = fut.result()
        finally:
            _stop_node(node, prog)
    if reply.header != STATS_REPLY:
        raise CliError(
            "%s answered, but does not serve statistics (start it with "
            "'chirp listen --serve-stats')" % target
        )
    try:
        stats = json.loads(reply.data.decode("utf-8"))
    except ValueError:
        raise CliError("%s sent statistics that are not JSON" % target) from None
    if args.json:
        _out(json.dumps(stats, indent=2, sort_keys=True))
    else:
        for line in format_stats(stats):
            _out(line)
    return 0


# -- chirp bench -----------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr when it is a terminal; one plain line per task otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._label = ""
        self._total = 1
        self._last = 0.0

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._last = label, max(total, 1), 0.0
        if self.tty:
            self.update(0, force=True)
        else:
            self.stream.write("chirp bench: %s ...\n" % label)
            self.stream.flush()

    def update(self, done: int, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        frac = min(done / self._total, 1.0)
        fill = int(frac * width)
        self.stream.write(
            "\r\x1b[K[%s%s] %3d%%  %s" % ("#" * fill, "." * (width - fill), frac * 100, self._label)
        )
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _package_env() -> Dict[str, str]:
    """The environment for a child ``python -m libchirp``: this package first on the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _bench_peer(argv: Sequence[str]) -> int:
    """The peer of ``chirp bench`` (child process): echo, or just take, what arrives.

    ``_bench-peer``: one asynchronous and one synchronous node, each on a free
    port. Messages with the header ``oneway`` are taken (released); every other
    message is sent back. Prints ``READY ASYNC_PORT SYNC_PORT`` once both nodes
    run; stops at EOF on stdin and prints ``BYE <echo failures>``.
    """
    stop = threading.Event()
    failures = [0]

    def serve(node: Chirp) -> None:
        def done(fut: Future[Any]) -> None:
            if fut.exception() is not None:
                failures[0] += 1

        while not stop.is_set():
            try:
                msg = node.get(timeout=0.1)  # AUTO_RELEASE: released here
            except queue.Empty:
                continue
            if msg.header != b"oneway":
                node.send(msg).add_done_callback(done)

    with Loop() as loop:
        nodes = []
        try:
            for synchronous in (False, True):
                config = Config()
                config.PORT = 0
                config.SYNCHRONOUS = synchronous
                config.DISABLE_ENCRYPTION = True
                try:
                    nodes.append(Chirp(loop, config))
                except (ChirpError, OSError) as exc:  # e.g. the port was taken meanwhile
                    print("FAILED %s" % _exc_text(exc), flush=True)
                    return 1
            threads = [threading.Thread(target=serve, args=(n,), daemon=True) for n in nodes]
            for t in threads:
                t.start()
            print("READY %d %d" % (nodes[0].port, nodes[1].port), flush=True)
            sys.stdin.read()
            stop.set()
            for t in threads:
                t.join(10)
        finally:
            for node in nodes:
                node.stop()
    print("BYE %d" % failures[0], flush=True)
    return 0


def _run_shape(
    node: Chirp,
    port: int,
    kind: str,
    count: int,
    window: int,
    payload: bytes,
    progress: Progress,
    limit: float,
) -> float:
    """Run one shape against the peer at 127.0.0.1:port; return the elapsed seconds."""
    pending: collections.deque[Any] = collections.deque()

    def settle(fut: Future[Any]) -> Any:
        _wait(fut, limit, "a bench message")
        exc = fut.exception()
        if exc is not None:
            raise CliError("a %s message failed: %s" % (kind, _exc_text(exc)))
        return fut.result()

    def new(header: bytes) -> Message:
        msg = Message()
        msg.address = "127.0.0.1"
        msg.port = port
        msg.header = header
        msg.data = payload
        return msg

    start = time.perf_counter()
    for i in range(count):
        if kind == "roundtrip":
            pending.append(node.request(new(b"rt")))
        else:
            pending.append(node.send(new(b"oneway")))
        while len(pending) >= window:
            settle(pending.popleft())
        if not i & 63:
            progress.update(i)
    while pending:
        settle(pending.popleft())
    if kind == "stream":
        # Messages of one connection arrive in order: once the peer answered this
        # request, it has taken every message of the stream.
        settle(node.request(new(b"flush")))
    return time.perf_counter() - start


def _collect(child: subprocess.Popen[str], lines: List[str], ready: threading.Event) -> None:
    """Collect the peer's output lines; ``ready`` is set at READY, FAILED or its end."""
    assert child.stdout is not None
    for line in child.stdout:
        lines.append(line.strip())
        if line.startswith(("READY", "FAILED")):
            ready.set()
    ready.set()


def _start_bench_peer() -> Tuple[subprocess.Popen[str], List[int], List[str]]:
    """Start the peer process; its nodes take free ports and it reports them.

    Returns the process, its ports (asynchronous node, synchronous node) and the
    list its output lines are collected in.
    """
    child = subprocess.Popen(
        [sys.executable, "-m", "libchirp", BENCH_PEER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_package_env(),
        text=True,
    )
    ready = threading.Event()
    lines: List[str] = []
    threading.Thread(target=_collect, args=(child, lines, ready), daemon=True).start()
    ready.wait(60)
    if lines and lines[-1].startswith("READY ") and child.poll() is None:
        return child, [int(p) for p in lines[-1].split()[1:3]], lines
    problem = lines[-1] if lines else "no output"
    _end_child(child)
    raise CliError("the peer node (a child process) did not start: %s" % problem)


def _end_child(child: subprocess.Popen[str]) -> None:
    """Close the child's stdin (its signal to stop) and wait for it, bounded."""
    if child.stdin is not None:
        try:
            child.stdin.close()
        except OSError:
            pass
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)


def cmd_bench(args: argparse.Namespace) -> int:
    prog = args.prog
    count, size = args.count, args.size
    payload = os.urandom(size)
    shapes = [
        # label, mode, kind, window
        ("roundtrips, 1 in flight", "async", "roundtrip", 1),
        ("roundtrips, 16 in flight", "async", "roundtrip", 16),
        ("roundtrips, 1 in flight", "sync", "roundtrip", 1),
        ("one-way stream", "async", "stream", 1024),
        ("one-way stream", "sync", "stream", 16),
    ]
    results = []
    progress = Progress()
    child, peer_ports, lines = _start_bench_peer()
    try:
        with Loop() as loop:
            nodes: Dict[str, Chirp] = {}
            try:
                for mode in ("async", "sync"):
                    config = Config()
                    config.PORT = 0  # a free port
                    config.SYNCHRONOUS = mode == "sync"
                    config.TIMEOUT = args.timeout
                    config.DISABLE_ENCRYPTION = True  # 127.0.0.1 is never encrypted
                    nodes[mode] = _start_node(loop, config)
                limit = 3 * args.timeout + _SLACK
                for mode, peer in (("async", peer_ports[0]), ("sync", peer_ports[1])):
                    _run_shape(nodes[mode], peer, "roundtrip", 10, 1, payload, progress, limit)
                for label, mode, kind, window in shapes:
                    peer = peer_ports[0] if mode == "async" else peer_ports[1]
                    progress.start("%s (%s)" % (label, mode), count)
                    try:
                        took = _run_shape(
                            nodes[mode], peer, kind, count, window, payload, progress, limit
                        )
                    finally:
                        progress.finish()
                    results.append((label, mode, kind, took))
            finally:
                for node in nodes.values():
                    _stop_node(node, prog)
    finally:
        _end_child(child)
    _out(
        "chirp bench: %d messages per shape, %d B of data each, two nodes in two processes "
        "over 127.0.0.1" % (count, size)
    )
    head = ("shape", "mode", "messages", "seconds", "roundtrips/s", "messages/s", "MiB/s")
    rows = [head]
    for label, mode, kind, took in results:
        took = max(took, 1e-9)
        messages = 2 * count if kind == "roundtrip" else count
        rows.append(
            (
                label,
                mode,
                str(messages),
                "%.3f" % took,
                "%.0f" % (count / took) if kind == "roundtrip" else "-",
                "%.0f" % (messages / took),
                "%.2f" % (messages * size / took / 1048576.0),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
        _out("  ".join(cells))
    bye = [line for line in lines if line.startswith("BYE")]
    if child.returncode != 0 or not bye or bye[0] != "BYE 0":
        _err(
            "%s: warning: the peer process ended with status %s (%s)"
            % (prog, child.returncode, bye[0] if bye else "no BYE")
        )
    return 0


# -- chirp pki -------------------------------------------------------------------------------------


def _run_pki(argv: Sequence[str], prog: str) -> int:
    try:
        from . import pki
    except ImportError as exc:
        _err(
            "%s pki: error: needs the 'cryptography' package, which the extra 'tls' "
            "installs: pip install 'libchirp[tls]' (%s)" % (prog, exc)
        )
        return 1
    return pki.main(list(argv), prog="%s pki" % prog)


# -- the parser ------------------------------------------------------------------------------------


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser of the ``chirp`` command (``pki`` is forwarded before it)."""
    parser = _Parser(
        prog=prog,
        description="Talk to chirp nodes: listen, send, benchmark, statistics, certificates.",
        epilog="Run '%s COMMAND --help' for the options of a command.\n\n%s\n\n"
        "Exit status: 0 done, 1 the command failed, 2 bad arguments, 130 Ctrl-C "
        "(chirp listen: 0)." % (prog, _limits_text()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="libchirp %s" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "listen",
        help="run a node and print every message that arrives",
        formatter_class=fmt,
        description="Run a node and print every message that arrives, one line each on stdout:\n"
        "  ADDRESS:PORT header=b'...' data=b'...'\n"
        "(the sender's address and listening port; header and data repr-escaped). A message\n"
        "is released after it was printed, so a synchronous sender's send completes then.",
    )
    _add_node_options(p, "port to listen on (default: %(default)s)", 2998)
    p.add_argument(
        "--echo",
        action="store_true",
        help="send every message back to its sender (an answer to a request)",
    )
    p.add_argument(
        "--count",
        type=_int_arg(0),
        default=0,
        metavar="N",
        help="exit after N messages (default: run until Ctrl-C or SIGTERM)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="repr",
        help="repr: one line per message, header and data as bytes literals (the default); "
        "hex: the same with hex digits; raw: only the data, as it is, and a newline",
    )
    p.add_argument(
        "--max-slots",
        type=_int_arg(*[int(x) for x in LIMITS["--max-slots"][1:3]]),
        default=0,
        metavar="S",
        help="Config.MAX_SLOTS: unreleased messages per connection, 1..32 "
        "(default: 16 with --async, 1 in synchronous mode)",
    )
    p.add_argument(
        "--max-bytes",
        type=_int_arg(0),
        default=256,
        metavar="B",
        help="print at most B bytes of header and data (0: all; default: %(default)s)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print identity, serial and the sender's node identity",
    )
    p.add_argument(
        "--stats-every",
        type=_float_arg(*LIMITS["--stats-every"][1:3]),
        metavar="S",
        help="print the node's statistics to stderr at the first S seconds, then every S "
        "seconds what changed, and all of them at exit",
    )
    p.add_argument(
        "--serve-stats",
        action="store_true",
        help="answer 'chirp stats' requests with this node's statistics",
    )
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser(
        "send",
        help="send DATA to a node and print the result of each send",
        formatter_class=fmt,
        description="Send DATA to the node at ADDR:PORT and print the result of each send on\n"
        "stdout. Exits with status 1 if any send failed. In synchronous mode (the default) a\n"
        "send succeeds once the receiver released the message; in --async mode once it is\n"
        "written. With --request, wait for each answer (e.g. from 'chirp listen --echo')\n"
        "and print it. Ctrl-C stops at once (status 130).",
    )
    p.add_argument(
        "address",
        type=_address_arg,
        metavar="ADDR:PORT",
        help="IP address and port, e.g. 127.0.0.1:2998 or [::1]:2998",
    )
    p.add_argument(
        "data",
        nargs="?",
        metavar="DATA",
        help="the data (UTF-8); '{n}' is replaced by the message number; "
        "'-' reads the data from stdin (all of it, one message)",
    )
    p.add_argument("--file", metavar="FILE", help="send the contents of FILE (bytes, as they are)")
    p.add_argument(
        "--lines",
        action="store_true",
        help="send each line of stdin as one message (without its newline), as it comes",
    )
    p.add_argument("--header", default="", metavar="H", help="the header (UTF-8)")
    p.add_argument(
        "--count",
        type=_int_arg(1),
        metavar="N",
        help="send N messages (default: 1; with --lines: at most N lines, default all)",
    )
    p.add_argument(
        "--interval",
        type=_float_arg(*LIMITS["--interval"][1:3]),
        default=0.0,
        metavar="S",
        help="start a send every S seconds, a steady rate (default: as fast as the window allows)",
    )
    p.add_argument(
        "--window",
        type=_int_arg(1),
        default=16,
        metavar="W",
        help="at most W sends in flight (default: %(default)s)",
    )
    p.add_argument(
        "--request", action="store_true", help="wait for an answer to each message and print it"
    )
    p.add_argument(
        "--max-bytes",
        type=_int_arg(0),
        default=256,
        metavar="B",
        help="print at most B bytes of an answer (0: all; default: %(default)s)",
    )
    _add_node_options(
        p, "port this node listens on, where answers arrive (default: a free one)", None
    )
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "stats",
        help="print the statistics of a running 'chirp listen --serve-stats' node",
        formatter_class=fmt,
        description="Ask the node at ADDR:PORT for its statistics and print them. The node\n"
        "must be a 'chirp listen --serve-stats' (it answers a message with the header\n"
        "'chirp.stats?' with its statistics as JSON). Other programs can offer the same:\n"
        "see the CLI page of the documentation.",
    )
    p.add_argument(
        "address", type=_address_arg, metavar="ADDR:PORT", help="the node, e.g. 127.0.0.1:2998"
    )
    p.add_argument("--json", action="store_true", help="print the JSON as received")
    _add_node_options(p, "port this node listens on (default: a free one)", None)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "bench",
        help="benchmark two local nodes (two processes) and print a table",
        formatter_class=fmt,
        description="Start a peer node in a child process and a node in this one, run several\n"
        "shapes over 127.0.0.1 and print a table of roundtrips/s and messages/s:\n"
        "roundtrips (request and answer) with 1 and 16 in flight, a one-way asynchronous\n"
        "stream and a one-way synchronous stream. A progress bar goes to stderr when it\n"
        "is a terminal.",
    )
    p.add_argument(
        "--count",
        type=_int_arg(1),
        default=5000,
        metavar="N",
        help="messages (or roundtrips) per shape (default: %(default)s)",
    )
    p.add_argument(
        "--size",
        type=_int_arg(0, 64 * 1048576),
        default=64,
        metavar="B",
        help="bytes of data per message (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_float_arg(0.1, 1200.0),
        default=5.0,
        metavar="T",
        help="Config.TIMEOUT in seconds (default: %(default)s)",
    )
    p.set_defaults(func=cmd_bench)

    sub.add_parser(
        "pki",
        help="create certificates for TLS: ca, node, dh ('chirp pki --help')",
        add_help=False,
    )
    parser.commands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """Run the ``chirp`` command with ``argv`` (default ``sys.argv[1:]``); return the status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["pki"]:
        return _run_pki(args_list[1:], prog)
    if args_list[:1] == [BENCH_PEER]:
        try:
            return _bench_peer(args_list[1:])
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
            return 130
    parser = build_parser(prog)
    try:
        args, extra = parser.parse_known_args(args_list)
        if extra:  # reported by the subcommand, so the message names it
            commands: Dict[str, argparse.ArgumentParser]
            commands = parser.commands  # type: ignore[attr-defined]
            commands[args.command].error("unrecognized arguments: " + " ".join(extra))
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    args.prog = "%s %s" % (prog, args.command)
    try:
        return int(args.func(args))
    except UsageError as exc:
        _err("%s: error: %s (see --help)" % (args.prog, exc))
        return 2
    except CliError as exc:
        _err("%s: error: %s" % (args.prog, exc))
        return 1
    except KeyboardInterrupt:
        _err("%s: interrupted" % args.prog)
        return 130
    except BrokenPipeError:
        # stdout went away (e.g. piped into head): quietly stop writing to it.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except (ChirpError, OSError, ValueError, RuntimeError) as exc:
        _err("%s: error: %s" % (args.prog, _exc_text(exc)))
        return 1


if __name__ == "__main__":
    sys.exit(main())
