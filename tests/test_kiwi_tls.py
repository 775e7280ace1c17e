"""libchirp.kiwi between two hosts over TLS (docs/kiwi.md, docs/tls.md).

Two network namespaces (tests/netns.py; needs root, fails rather than skips
without it) each run a member (tests/kiwiproc.py) with a certificate of one
test CA. The member on the second host knows only the first one's address;
it joins the mesh, calls the first member's RPC and sends it a task, all over
TLS (the peers' addresses are not loopback). A member whose certificate comes
from a foreign CA cannot join: its calls stay unroutable.
"""

from __future__ import annotations

import os
import sys

import pytest

from libchirp import pki

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import netns  # noqa: E402
from test_kiwi_mesh import Member  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kiwi-pki")
    pki.create_ca(base / "ca", name="kiwi test CA")
    pki.create_ca(base / "foreign", name="foreign CA")
    return {
        "a": pki.issue_node(base / "ca", base / "a.pem", name="a"),
        "b": pki.issue_node(base / "ca", base / "b.pem", name="b"),
        "x": pki.issue_node(base / "foreign", base / "x.pem", name="x"),
        "dh": pki.write_dh_params(base / "dh.pem"),
    }


@pytest.fixture
def hosts():
    try:
        h = netns.Hosts(2)
    except netns.NetnsUnavailable as exc:
        pytest.fail("network namespaces unavailable: %s" % exc, pytrace=False)
    yield h
    h.close()


def test_rpc_and_task_over_tls_between_hosts(hosts, certs):
    started = []
    try:
        server = Member(
            "--name",
            "a",
            "--rpc",
            "--worker",
            "0",
            "--cert",
            certs["a"],
            "--dh",
            certs["dh"],
            wrap=lambda argv: hosts.command(0, argv),
        )
        started.append(server)
        peer = "%s:%d" % (hosts.addr(0), server.port)
        client = Member(
            "--name",
            "b",
            "--peer",
            peer,
            "--client",
            "a",
            "--cert",
            certs["b"],
            "--dh",
            certs["dh"],
            wrap=lambda argv: hosts.command(1, argv),
        )
        started.append(client)
        rpc = client.wait_line("RESULT", limit=40)
        assert rpc == 'RESULT {"name": "a", "msg": "hello"}'
        client.proc.wait(30)
        task = [line for line in client.lines if line.startswith("RESULT")][1]
        assert task == 'RESULT {"worker": "a", "task": "tls task"}'
        assert client.proc.returncode == 0
        # a member with a certificate of another CA never joins
        stranger = Member(
            "--name",
            "x",
            "--peer",
            peer,
            "--client",
            "a",
            "--client-wait",
            "3",
            "--cert",
            certs["x"],
            "--dh",
            certs["dh"],
            wrap=lambda argv: hosts.command(1, argv),
        )
        started.append(stranger)
        assert stranger.wait_line("RESULT", limit=30) == "RESULT unroutable"
    finally:
        for member in started:
            member.stop()
