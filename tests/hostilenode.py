"""A chirp node in a process of its own, for tests/test_hostile.py.

    python tests/hostilenode.py --port PORT [--timeout T] [--nofile N]
        [--as-extra MIB] [--max-connections N] [--per-address N]

The node (``libchirp.queue.Chirp``, AUTO_RELEASE, synchronous) takes every
received message with ``get()`` on a consumer thread, so its slots are released
as fast as messages arrive. Resource limits are set in this process only:
``--nofile`` lowers RLIMIT_NOFILE before the node starts; ``--as-extra``
limits the address space (RLIMIT_AS) to the virtual size measured right after
the node started plus MIB mebibytes; ``--hog-leave N`` then opens files until
only N descriptors are left (so that the node's accept() meets EMFILE).

Commands on stdin, one per line; each is answered with one flushed line:

    STATS   STATS <json>: the node's statistics (connections, totals), the number
            of messages taken, and VmRSS/VmHWM/VmSize/VmPeak in KiB
    UNHOG   close the descriptors --hog-leave took; UNHOGGED
    QUIT    the node and the loop stop; BYE, then the process exits

It prints ``READY <port> <as limit in bytes or 0>`` once the node runs. EOF on
stdin acts as QUIT.
"""

import argparse
import json
import os
import queue
import resource
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import libchirp  # noqa: E402
import libchirp.queue  # noqa: E402


def say(*parts):
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


#: Opened once, so that reading it needs no descriptor when they are all used up.
_STATUS = open("/proc/self/status")  # noqa: SIM115


def memory():
    """VmRSS, VmHWM, VmSize, VmPeak of this process in KiB."""
    out = {}
    _STATUS.seek(0)
    for line in _STATUS.read().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "VmPeak"):
            out[key] = int(value.split()[0])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--nofile", type=int, default=0)
    ap.add_argument("--as-extra", type=int, default=0)
    ap.add_argument("--max-connections", type=int, default=0)
    ap.add_argument("--per-address", type=int, default=0)
    ap.add_argument("--hog-leave", type=int, default=-1)
    args = ap.parse_args()

    if args.nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))

    config = libchirp.Config()
    config.PORT = args.port
    config.TIMEOUT = args.timeout
    config.DISABLE_ENCRYPTION = True
    if args.max_connections:
        config.MAX_CONNECTIONS = args.max_connections
    if args.per_address:
        config.MAX_CONNECTIONS_PER_ADDRESS = args.per_address
    loop = libchirp.Loop()
    node = libchirp.queue.Chirp(loop, config)

    taken = [0]
    done = threading.Event()

    def consume():
        while not done.is_set():
            try:
                node.get(timeout=0.2)
            except queue.Empty:
                continue
            except Exception:  # the node stopped
                return
            taken[0] += 1

    consumer = threading.Thread(target=consume, name="consumer", daemon=True)
    consumer.start()

    as_limit = 0
    if args.as_extra:
        as_limit = memory()["VmSize"] * 1024 + args.as_extra * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
    hog = []
    if args.hog_leave >= 0:
        # Use up the file descriptors but hog_leave (EMFILE for the node's accept()).
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for _ in range(min(args.hog_leave, len(hog))):
            os.close(hog.pop())
    say("READY", node.port, as_limit)

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "STATS":
            st = node.statistics()
            report = {
                "connections": st["connections"],
                "totals": st["totals"],
                "remotes": len(st["remotes"]),
                "taken": taken[0],
                "memory": memory(),
            }
            say("STATS", json.dumps(report))
        elif cmd == "UNHOG":
            for fd in hog:
                os.close(fd)
            hog = []
            say("UNHOGGED")
        elif cmd == "QUIT":
            break
    done.set()
    consumer.join(5)
    node.stop()
    loop.stop()
    say("BYE")


if __name__ == "__main__":
    main()
