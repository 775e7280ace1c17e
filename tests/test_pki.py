"""Tests for libchirp.pki: the certificate files chirp nodes use for TLS.

A CA, two nodes of it and a node of a foreign CA are created once per module
in a temporary directory (RSA key generation is the slow part). The files are
checked for the CERT_CHAIN_PEM layout of docs/tls.md#the-two-files-a-node-needs (key, leaf, CA) and
then used the way a node uses them, with Python's ssl module over a real
socketpair: mutual authentication succeeds within one CA, on TLS 1.3 and on
TLS 1.2 with the DHE suite and the written DH parameters, and fails across
CAs. The command line is run in a subprocess, as a user would run it.

Nothing here needs libchirp's compiled extension.
"""

import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import warnings

import pytest
from cryptography.exceptions import InvalidSignature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from libchirp import pki  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# `openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048`
FFDHE2048_PEM = (
    "-----BEGIN DH PARAMETERS-----\n"
    "MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n"
    "+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n"
    "87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n"
    "YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n"
    "7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n"
    "ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n"
    "-----END DH PARAMETERS-----\n"
)

CHIRP_TLS12_CIPHERS = (
    "DHE-DSS-AES256-GCM-SHA384:DHE-RSA-AES256-GCM-SHA384:"
    "DHE-RSA-AES256-SHA256:DHE-DSS-AES256-SHA256"
)


class Material:
    """Paths of the files made by the ``material`` fixture."""

    def __init__(self, base):
        self.base = base
        self.ca_dir = base / "ca"
        self.ca_cert, self.ca_key = pki.create_ca(self.ca_dir, name="test CA", days=30)
        self.node_a = pki.issue_node(self.ca_dir, base / "a.pem", name="node a", days=30)
        self.node_b = pki.issue_node(self.ca_dir, base / "b.pem", name="node b")
        self.dh = pki.write_dh_params(base / "dh.pem")
        self.foreign_dir = base / "foreign"
        self.foreign_ca, _ = pki.create_ca(self.foreign_dir, name="foreign CA")
        self.foreign = pki.issue_node(self.foreign_dir, base / "f.pem", name="intruder")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return Material(tmp_path_factory.mktemp("pki"))


def pem_blocks(path):
    """[(label, pem_bytes)] of the file, in order."""
    text = path.read_text()
    return [
        (m.group(1), m.group(0).encode())
        for m in re.finditer(r"-----BEGIN ([A-Z0-9 .]+)-----\n.*?-----END \1-----\n", text, re.S)
    ]


def common_name(cert):
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def test_files_created(material):
    for p in (material.ca_cert, material.ca_key, material.node_a, material.dh):
        assert p.is_file() and p.stat().st_size > 0
    assert material.ca_cert.name == pki.CA_CERT_FILE and material.ca_key.name == pki.CA_KEY_FILE
    # Files with private keys are readable by the owner only.
    for p in (material.ca_key, material.node_a):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_ca_certificate(material):
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    assert common_name(ca) == "test CA"
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ca.verify_directly_issued_by(ca)  # self-signed
    key = serialization.load_pem_private_key(material.ca_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()


def test_chain_file_order_key_leaf_ca(material):
    blocks = pem_blocks(material.node_a)
    assert [label for label, _ in blocks] == ["RSA PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    assert material.node_a.read_text() == b"".join(pem for _, pem in blocks).decode()
    key = serialization.load_pem_private_key(blocks[0][1], password=None)
    leaf = x509.load_pem_x509_certificate(blocks[1][1])
    ca = x509.load_pem_x509_certificate(blocks[2][1])
    assert key.key_size == 2048
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
    assert common_name(leaf) == "node a"
    assert blocks[2][1] == material.ca_cert.read_bytes()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_leaf_verifies_against_ca(material):
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    foreign_ca = x509.load_pem_x509_certificate(material.foreign_ca.read_bytes())
    for path in (material.node_a, material.node_b):
        leaf = x509.load_pem_x509_certificate(pem_blocks(path)[1][1])
        leaf.verify_directly_issued_by(ca)
        assert leaf.issuer == ca.subject
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        with pytest.raises((ValueError, InvalidSignature)):
            leaf.verify_directly_issued_by(foreign_ca)


def test_dh_params_are_ffdhe2048_pkcs3(material):
    text = material.dh.read_text()
    assert text == FFDHE2048_PEM
    assert text.startswith("-----BEGIN DH PARAMETERS-----\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        numbers = serialization.load_pem_parameters(text.encode()).parameter_numbers()
    assert numbers.p == pki.FFDHE2048_P and numbers.g == 2
    assert numbers.p.bit_length() == 2048


# --------------------------------------------------------------------------
# TLS with Python's ssl module over a socketpair
# --------------------------------------------------------------------------


def server_context(chain, trust, dh=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(chain))  # the key is taken from the same file
    ctx.load_verify_locations(cafile=str(trust))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if dh is not None:
        ctx.set_ciphers(CHIRP_TLS12_CIPHERS)
        ctx.load_dh_params(str(dh))
    return ctx


def client_context(chain, trust, max_tls12=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # chirp checks no names
    ctx.load_cert_chain(str(chain))
    ctx.load_verify_locations(cafile=str(trust))
    if max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def run_pair(server_ctx, client_ctx):
    """Handshake both contexts over a socketpair; the client sends b"ping",
    the server answers b"pong". Returns (server_result, client_result), each
    a dict with "error" or "cipher", "version", "peer_cn"."""
    s_sock, c_sock = socket.socketpair()
    s_sock.settimeout(10)
    c_sock.settimeout(10)
    results = {}

    def serve():
        res = results.setdefault("server", {})
        try:
            with server_ctx.wrap_socket(s_sock, server_side=True) as tls:
                res.update(describe(tls))
                res["got"] = tls.recv(4)
                tls.sendall(b"pong")
        except (ssl.SSLError, OSError) as e:
            res["error"] = e
            s_sock.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    res = results.setdefault("client", {})
    try:
        with client_ctx.wrap_socket(c_sock, server_side=False) as tls:
            res.update(describe(tls))
            tls.sendall(b"ping")
            res["got"] = tls.recv(4)
    except (ssl.SSLError, OSError) as e:
        res["error"] = e
        c_sock.close()
    t.join(15)
    assert not t.is_alive(), "server thread hangs"
    return results["server"], results["client"]


def describe(tls):
    peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    return {"version": tls.version(), "cipher": tls.cipher()[0], "peer_cn": common_name(peer)}


@pytest.mark.parametrize("trust", ["ca_file", "chain_file"])
def test_tls13_mutual_auth(material, trust):
    # chirp trusts every certificate of its own chain file (docs/tls.md#the-two-files-a-node-needs);
    # verifying against the plain CA file must work as well.
    s_trust = material.ca_cert if trust == "ca_file" else material.node_a
    c_trust = material.ca_cert if trust == "ca_file" else material.node_b
    server, client = run_pair(
        server_context(material.node_a, s_trust), client_context(material.node_b, c_trust)
    )
    assert "error" not in server and "error" not in client, (server, client)
    assert server["version"] == client["version"] == "TLSv1.3"
    assert server["peer_cn"] == "node b" and client["peer_cn"] == "node a"
    assert server["got"] == b"ping" and client["got"] == b"pong"


def test_tls12_dhe_with_dh_file(material):
    server, client = run_pair(
        server_context(material.node_a, material.ca_cert, dh=material.dh),
        client_context(material.node_b, material.ca_cert, max_tls12=True),
    )
    assert "error" not in server and "error" not in client, (server, client)
    assert client["version"] == "TLSv1.2"
    assert client["cipher"] == "DHE-RSA-AES256-GCM-SHA384"
    assert server["got"] == b"ping" and client["got"] == b"pong"


def test_tls_foreign_client_rejected(material):
    # The intruder trusts our CA (so it accepts the server) but presents a
    # certificate of its own CA: the server must refuse it.
    server, client = run_pair(
        server_context(material.node_a, material.ca_cert),
        client_context(material.foreign, material.ca_cert),
    )
    assert isinstance(server.get("error"), ssl.SSLError)
    assert "certificate verify failed" in str(server["error"])
    assert "error" in client  # the alert, or the closed socket, ends its read
    assert server.get("got") is None and client.get("got") is None


def test_tls_foreign_server_rejected(material):
    server, client = run_pair(
        server_context(material.foreign, material.foreign_ca),
        client_context(material.node_b, material.ca_cert),
    )
    assert isinstance(client.get("error"), ssl.SSLCertVerificationError)
    assert "error" in server


# --------------------------------------------------------------------------
# API errors
# --------------------------------------------------------------------------


def test_create_ca_refuses_to_replace(material, tmp_path):
    with pytest.raises(pki.PkiError, match="exists already"):
        pki.create_ca(material.ca_dir)
    cert, _ = pki.create_ca(tmp_path / "ca", name="one")
    first = cert.read_bytes()
    cert2, _ = pki.create_ca(tmp_path / "ca", name="two", force=True)
    assert cert2 == cert and cert.read_bytes() != first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"key_size": 1024}, "at least 2048 bits"),
        ({"days": 0}, "days must be at least 1"),
        ({"name": ""}, "name must not be empty"),
    ],
)
def test_create_ca_bad_values(tmp_path, kwargs, match):
    with pytest.raises(pki.PkiError, match=match):
        pki.create_ca(tmp_path / "ca", **kwargs)
    assert not (tmp_path / "ca" / pki.CA_KEY_FILE).exists()


def test_issue_node_without_ca(tmp_path):
    with pytest.raises(pki.PkiError, match="not found"):
        pki.issue_node(tmp_path / "nope", tmp_path / "n.pem")
    (tmp_path / "half").mkdir()
    with pytest.raises(pki.PkiError, match="CA key .*ca.key: not found"):
        pki.issue_node(tmp_path / "half", tmp_path / "n.pem")


def test_issue_node_mismatched_ca(material, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / pki.CA_KEY_FILE).write_bytes((material.foreign_dir / pki.CA_KEY_FILE).read_bytes())
    (mixed / pki.CA_CERT_FILE).write_bytes(material.ca_cert.read_bytes())
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.issue_node(mixed, tmp_path / "n.pem")


def test_main_in_process(material, tmp_path, capsys):
    assert pki.main(["dh", "--out", str(tmp_path / "d.pem")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'd.pem'}\n"
    assert pki.main(["node", "--ca", str(tmp_path / "x"), "--out", str(tmp_path / "n")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: CA directory" in err
    assert pki.main(["frobnicate"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert pki.main(["--help"]) == 0


# --------------------------------------------------------------------------
# Command line in a subprocess
# --------------------------------------------------------------------------


def run_cli(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "libchirp.pki", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=60,
    )


def test_cli_round_trip(tmp_path):
    ca_dir, node, dh = tmp_path / "ca", tmp_path / "node.pem", tmp_path / "dh.pem"
    r = run_cli("ca", "--out", ca_dir, "--name", "cli CA", "--days", "10")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(ca_dir / pki.CA_CERT_FILE), str(ca_dir / pki.CA_KEY_FILE)]
    r = run_cli("node", "--ca", ca_dir, "--out", node, "--name", "cli node", "--key-size", "3072")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(node)]
    r = run_cli("dh", "--out", dh)
    assert r.returncode == 0, r.stderr
    assert dh.read_text() == FFDHE2048_PEM

    blocks = pem_blocks(node)
    assert [label for label, _ in blocks] == ["RSA PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    key = serialization.load_pem_private_key(blocks[0][1], password=None)
    leaf = x509.load_pem_x509_certificate(blocks[1][1])
    ca = x509.load_pem_x509_certificate((ca_dir / pki.CA_CERT_FILE).read_bytes())
    assert key.key_size == 3072
    assert common_name(leaf) == "cli node" and common_name(ca) == "cli CA"
    leaf.verify_directly_issued_by(ca)
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


@pytest.mark.parametrize(
    "args, status, text",
    [
        ((), 2, "required: COMMAND"),
        (("bogus",), 2, "invalid choice"),
        (("ca",), 2, "required: --out"),
        (("ca", "--out", "{tmp}/c", "--days", "soon"), 2, "not an integer"),
        (("ca", "--out", "{tmp}/c", "--key-size", "512"), 1, "at least 2048 bits"),
        (("node", "--ca", "{tmp}/missing", "--out", "{tmp}/n.pem"), 1, "not found"),
        (("dh", "--out", "{tmp}/no/such/dir/dh.pem"), 1, "cannot write"),
    ],
)
def test_cli_bad_arguments(tmp_path, args, status, text):
    r = run_cli(*(a.format(tmp=tmp_path) for a in args))
    assert r.returncode == status
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr  # exactly one line
    assert r.stderr.startswith("python -m libchirp.pki") and "error: " in r.stderr
    assert text in r.stderr
