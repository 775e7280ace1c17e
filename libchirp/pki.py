"""Certificate tooling for chirp nodes that use TLS.

Theory of operation
-------------------
Chirp nodes authenticate each other mutually with certificates of one private
certificate authority (docs/tls.md#what-is-negotiated and
docs/tls.md#the-two-files-a-node-needs). A node reads everything from two files:

* ``CERT_CHAIN_PEM``: one PEM file holding the node's private key, its leaf
  certificate and then the CA certificate. The node trusts every certificate
  in it, presents the first certificate (with the rest as its chain) and uses
  the first private key. The key is written as a traditional PKCS#1
  ``RSA PRIVATE KEY`` block, the format of the libchirp 1.x test material.
* ``DH_PARAMS_PEM``: PKCS#3 ``DH PARAMETERS`` for the TLS 1.2 DHE suites. This
  module writes the well-known RFC 7919 ffdhe2048 group instead of generating
  parameters (which takes minutes and gains nothing).

The CA lives in a directory of its own (``ca.key`` and ``ca.pem``); ``issue_node``
reads it to sign node certificates. Files holding private keys are created
with mode 0600.

Leaf certificates carry both TLS purposes (serverAuth and clientAuth), since a
node is the TLS server on accepted connections and the TLS client on the ones
it opens. Names are informational only: chirp never checks host names.

The module depends only on the ``cryptography`` package, never on libchirp's
compiled extension, so ``python -m libchirp.pki`` works without a build (as
long as importing the ``libchirp`` package itself does not require one).

Command line::

    python -m libchirp.pki ca   --out DIR  [--name CN] [--days N] [--key-size BITS] [--force]
    python -m libchirp.pki node --ca DIR --out FILE [--name CN] [--days N] [--key-size BITS]
                                [--force]
    python -m libchirp.pki dh   --out FILE [--force]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Sequence, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dh, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "FFDHE2048_P",
    "PkiError",
    "create_ca",
    "dh_params_pem",
    "issue_node",
    "main",
    "write_dh_params",
]

PathLike = Union[str, "os.PathLike[str]"]

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
DEFAULT_DAYS = 3650
DEFAULT_KEY_SIZE = 2048
MIN_KEY_SIZE = 2048  # what OpenSSL's common default security level 2 accepts

# RFC 7919, appendix A.1: the ffdhe2048 prime; the generator is 2.
FFDHE2048_P = int(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695"
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A"
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935"
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A"
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4"
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61"
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005"
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B423861285C97FFFFFFFFFFFFFFFF",
    16,
)


class PkiError(Exception):
    """A problem the user can fix (bad argument, missing or unusable file).

    The message is one line and names the file or argument concerned.
    """


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _check_days(days: int) -> None:
    if days < 1:
        raise PkiError(f"days must be at least 1 (got {days})")


def _new_key(key_size: int) -> rsa.RSAPrivateKey:
    if key_size < MIN_KEY_SIZE:
        raise PkiError(f"key size must be at least {MIN_KEY_SIZE} bits (got {key_size})")
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise PkiError("name must not be empty")
    if len(common_name) > 64:
        raise PkiError(f"name must be at most 64 characters (got {len(common_name)})")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    # Start an hour early so that peers with slightly slow clocks accept it.
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write data to path, mode 0600 for files with private keys."""
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if private:
            os.chmod(path, 0o600)  # also when the file existed before
    except OSError as e:
        raise PkiError(f"{path}: cannot write: {e.strerror or e}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path}: not found") from None
    except OSError as e:
        raise PkiError(f"{what} {path}: cannot read: {e.strerror or e}") from None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(ca_dir: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    if not ca_dir.is_dir():
        raise PkiError(f"CA directory {ca_dir}: not found (create it with the 'ca' command)")
    key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / CA_CERT_FILE
    try:
        key = serialization.load_pem_private_key(_read(key_path, "CA key"), password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"CA key {key_path}: unusable: {e}") from None
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path, "CA certificate"))
    except ValueError as e:
        raise PkiError(f"CA certificate {cert_path}: unusable: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PkiError(f"CA key {key_path}: not an RSA key")
    cert_key = cert.public_key()
    if (
        not isinstance(cert_key, rsa.RSAPublicKey)
        or cert_key.public_numbers() != key.public_key().public_numbers()
    ):
        raise PkiError(f"CA directory {ca_dir}: {CA_KEY_FILE} does not match {CA_CERT_FILE}")
    return key, cert


# --------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------


def create_ca(
    out_dir: PathLike,
    name: str = "chirp CA",
    days: int = DEFAULT_DAYS,
    key_size: int = DEFAULT_KEY_SIZE,
    force: bool = False,
) -> tuple[Path, Path]:
    """Create a certificate authority in ``out_dir``.

    Writes a new RSA key (``ca.key``, PKCS#8, mode 0600) and a self-signed CA
    certificate (``ca.pem``, CA:TRUE) valid for ``days`` days. The directory is
    created if needed. An existing CA is never replaced unless ``force`` is
    true, because every node certificate it issued would become useless.

    Returns ``(cert_path, key_path)``. Raises :class:`PkiError`.
    """
    _check_days(days)
    subject = _name(name)
    out = Path(out_dir)
    key_path, cert_path = out / CA_KEY_FILE, out / CA_CERT_FILE
    if not force and (key_path.exists() or cert_path.exists()):
        raise PkiError(f"CA directory {out}: a CA exists already (use --force to replace it)")
    key = _new_key(key_size)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PkiError(f"CA directory {out}: cannot create: {e.strerror or e}") from None
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, private=True)
    _write(cert_path, _pem(cert), private=False)
    return cert_path, key_path


def issue_node(
    ca_dir: PathLike,
    out_file: PathLike,
    name: str = "chirp node",
    days: int = DEFAULT_DAYS,
    key_size: int = DEFAULT_KEY_SIZE,
) -> Path:
    """Issue a node certificate signed by the CA in ``ca_dir``.

    Writes ``out_file`` (mode 0600) in the CERT_CHAIN_PEM layout of
    docs/tls.md#the-two-files-a-node-needs: the node's new RSA private key as a PKCS#1
    ``RSA PRIVATE KEY`` block, then the node's certificate, then the CA
    certificate. Use the file as ``Config.CERT_CHAIN_PEM``; all nodes with a
    certificate of the same CA accept each other.

    Returns the path written. Raises :class:`PkiError`.
    """
    _check_days(days)
    subject = _name(name)
    ca_key, ca_cert = _load_ca(Path(ca_dir))
    key = _new_key(key_size)
    not_before, not_after = _validity(days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    if not_after <= not_before:
        raise PkiError(f"CA directory {ca_dir}: the CA certificate has expired")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:  # pragma: no cover - sanity check
        raise PkiError(f"CA directory {ca_dir}: issued certificate does not verify: {e}") from None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    out = Path(out_file)
    _write(out, key_pem + _pem(cert) + _pem(ca_cert), private=True)
    return out


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # keeps a leading 0 for the sign
    return b"\x02" + _der_length(len(body)) + body


def dh_params_pem(p: int = FFDHE2048_P, g: int = 2) -> bytes:
    """Encode DH parameters as PKCS#3 ``BEGIN DH PARAMETERS`` PEM.

    The encoding is written out here (DHParameter ::= SEQUENCE { prime
    INTEGER, base INTEGER }) because cryptography, on OpenSSL 3, recognizes
    the RFC 7919 groups and then emits the X9.42 form instead, while
    DH_PARAMS_PEM is specified as PKCS#3 (docs/tls.md#what-is-negotiated).
    """
    body = _der_integer(p) + _der_integer(g)
    der = b"\x30" + _der_length(len(body)) + body
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    text = "\n".join(["-----BEGIN DH PARAMETERS-----", *lines, "-----END DH PARAMETERS-----", ""])
    pem = text.encode("ascii")
    with warnings.catch_warnings():
        # Newer cryptography releases deprecate finite-field DH; the chirp
        # protocol needs it for its TLS 1.2 DHE suites (docs/tls.md#what-is-negotiated).
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        numbers = serialization.load_pem_parameters(pem).parameter_numbers()  # self-check
        same = isinstance(numbers, dh.DHParameterNumbers) and (numbers.p, numbers.g) == (p, g)
    if not same:
        raise PkiError("internal error: DH parameters do not round-trip")
    return pem


def write_dh_params(out_file: PathLike) -> Path:
    """Write the RFC 7919 ffdhe2048 group as PKCS#3 ``DH PARAMETERS`` PEM.

    Use the file as ``Config.DH_PARAMS_PEM``. Nothing is generated: the group
    is public and fixed, which is what RFC 7919 recommends.

    Returns the path written. Raises :class:`PkiError`.
    """
    out = Path(out_file)
    _write(out, dh_params_pem(), private=False)
    return out


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Create the certificate files chirp nodes use for TLS.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ca = sub.add_parser("ca", help="create a certificate authority (ca.key, ca.pem) in DIR")
    ca.add_argument("--out", required=True, metavar="DIR", help="directory for the CA files")
    ca.add_argument(
        "--name", default="chirp CA", metavar="CN", help="common name (default: %(default)s)"
    )
    ca.add_argument(
        "--days",
        type=_positive_int,
        default=DEFAULT_DAYS,
        metavar="N",
        help="validity in days (default: %(default)s)",
    )
    ca.add_argument(
        "--key-size",
        type=_positive_int,
        default=DEFAULT_KEY_SIZE,
        metavar="BITS",
        help="RSA key size (default: %(default)s)",
    )
    ca.add_argument("--force", action="store_true", help="replace an existing CA")

    node = sub.add_parser("node", help="issue a node certificate file (CERT_CHAIN_PEM)")
    node.add_argument("--ca", required=True, metavar="DIR", help="CA directory made by 'ca'")
    node.add_argument("--out", required=True, metavar="FILE", help="file to write: key, leaf, CA")
    node.add_argument(
        "--name", default="chirp node", metavar="CN", help="common name (default: %(default)s)"
    )
    node.add_argument(
        "--days",
        type=_positive_int,
        default=DEFAULT_DAYS,
        metavar="N",
        help="validity in days (default: %(default)s, capped by the CA's)",
    )
    node.add_argument(
        "--key-size",
        type=_positive_int,
        default=DEFAULT_KEY_SIZE,
        metavar="BITS",
        help="RSA key size (default: %(default)s)",
    )

    node.add_argument("--force", action="store_true", help="replace an existing --out file")

    dhp = sub.add_parser("dh", help="write DH parameters (DH_PARAMS_PEM), RFC 7919 ffdhe2048")
    dhp.add_argument("--out", required=True, metavar="FILE", help="file to write")
    dhp.add_argument("--force", action="store_true", help="replace an existing --out file")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m libchirp.pki") -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``).

    Prints the paths written, one per line. Returns the exit status: 0 on
    success, 1 when the command failed (one line on stderr), 2 for bad
    arguments. ``prog`` names the command in messages (a future ``chirp pki``
    passes its own).
    """
    parser = _parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        # Like a CA, an existing node file or DH file is only replaced on request.
        if args.command != "ca" and not args.force and os.path.exists(args.out):
            raise PkiError(f"{args.out} exists already (use --force to replace it)")
        if args.command == "ca":
            paths: Sequence[Path] = create_ca(
                args.out, name=args.name, days=args.days, key_size=args.key_size, force=args.force
            )
        elif args.command == "node":
            path = issue_node(
                args.ca, args.out, name=args.name, days=args.days, key_size=args.key_size
            )
            paths = [path]
        else:
            paths = [write_dh_params(args.out)]
    except PkiError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
