"""libchirp.mp between two hosts (network namespaces, tests/netns.py) over TLS.

* 2 producers and 2 consumers on each host, 4 + 4 in all, move 100,000 items
  (25,000 per producer) through a queue hosted on host A, over TLS between the
  hosts; every item arrives exactly once, each producer's order kept;
* a node whose certificate comes from another CA gets no item in and none out;
* examples/mp_two_hosts.py fans tasks out to workers on both hosts.

Needs root (network namespaces); without it the test fails with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import netns  # noqa: E402

from libchirp import pki  # noqa: E402

pytestmark = [pytest.mark.multiprocess]

ROLE = os.path.join(HERE, "mp_hostrole.py")
EXAMPLE = os.path.join(ROOT, "examples", "mp_two_hosts.py")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mp-pki")
    pki.create_ca(base / "ca", name="mp test CA")
    pki.create_ca(base / "other", name="other CA")
    return {
        "a": str(pki.issue_node(base / "ca", base / "a.pem", name="host a")),
        "b": str(pki.issue_node(base / "ca", base / "b.pem", name="host b")),
        "foreign": str(pki.issue_node(base / "other", base / "f.pem", name="foreign")),
        "dh": str(pki.write_dh_params(base / "dh.pem")),
    }


@pytest.fixture
def hosts():
    problem = None
    try:
        h = netns.Hosts(2)
    except netns.NetnsUnavailable as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail("multi-host tests need network namespaces: " + problem, pytrace=False)
    procs = []
    try:
        yield h, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
            if p.stdout is not None:
                p.stdout.close()
        h.close()


def popen(hosts, procs, i, argv):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    p = hosts.popen(
        i,
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )
    procs.append(p)
    return p


def wait_line(p, prefix, limit=60):
    import select
    import time

    deadline = time.monotonic() + limit
    seen = []
    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], 0.5)
        if r:
            line = p.stdout.readline()
            if not line:
                break
            seen.append(line.rstrip())
            if line.startswith(prefix):
                return line.strip(), seen
    pytest.fail("no %r line; output:\n%s" % (prefix, "\n".join(seen[-40:])), pytrace=False)


@pytest.mark.timeout(240)
def test_four_by_four_over_tls_between_hosts(hosts, certs):
    h, procs = hosts
    a = h.addr(0)
    port = 7400
    tls = ["--dh", certs["dh"]]
    host = popen(
        h, procs, 0,
        [ROLE, "host", "--address", a, "--port", str(port), "--cert", certs["a"], *tls,
         "--items", "25000"],
    )  # fmt: skip
    wait_line(host, "READY")
    remote = popen(
        h, procs, 1,
        [ROLE, "remote", "--connect", "%s:%d" % (a, port), "--cert", certs["b"], *tls,
         "--items", "25000"],
    )  # fmt: skip
    result, seen = wait_line(host, "RESULT", limit=200)
    print(result)
    fields = dict(kv.split("=", 1) for kv in result.split()[1:])
    assert fields["items"] == "100000"
    assert fields["missing"] == "0" and fields["extra"] == "0" and fields["dups"] == "0", result
    assert fields["order"] == "True", result
    # both hosts' consumers took part
    shares = dict(kv.split("=") for kv in fields["shares"].split(","))
    assert sum(int(v) for v in shares.values()) == 100000
    assert any(k.startswith("b") and int(v) > 0 for k, v in shares.items()), shares
    assert remote.wait(60) == 0
    assert host.wait(60) == 0


@pytest.mark.timeout(120)
def test_foreign_ca_is_refused(hosts, certs):
    h, procs = hosts
    a = h.addr(0)
    port = 7401
    tls = ["--dh", certs["dh"]]
    host = popen(
        h, procs, 0,
        [ROLE, "host", "--address", a, "--port", str(port), "--cert", certs["a"], *tls,
         "--producers", "0", "--consumers", "0", "--remote-producers", "1",
         "--remote-consumers", "0"],
    )  # fmt: skip
    wait_line(host, "READY")
    intruder = popen(
        h, procs, 1,
        [ROLE, "intruder", "--connect", "%s:%d" % (a, port), "--cert", certs["foreign"], *tls],
    )  # fmt: skip
    out, _ = intruder.communicate(timeout=90)
    print(out)
    assert "REFUSED put" in out and "REFUSED get" in out, out
    assert re.search(r"certificate|verif|alert|unknown ca|TLS", out, re.I), out
    assert "ACCEPTED" not in out, out


@pytest.mark.timeout(180)
def test_example_two_hosts(hosts, certs):
    h, procs = hosts
    a = h.addr(0)
    tls = ["--dh", certs["dh"]]
    host = popen(
        h, procs, 0,
        [EXAMPLE, "host", "--address", a, "--port", "7402", "--cert", certs["a"], *tls,
         "--workers", "2", "--remote-workers", "2", "--tasks", "1000"],
    )  # fmt: skip
    wait_line(host, "hosting")
    worker = popen(
        h, procs, 1,
        [EXAMPLE, "worker", "--connect", "%s:7402" % a, "--cert", certs["b"], *tls,
         "--workers", "2"],
    )  # fmt: skip
    result, _ = wait_line(host, "RESULT", limit=150)
    assert result.startswith("RESULT OK tasks=1000"), result
    assert re.search(r"B=\d+", result), result
    assert host.wait(60) == 0
    assert worker.wait(60) == 0
