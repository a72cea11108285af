"""A small certificate authority for federations, built on ``cryptography``.

What a federation needs, and nothing more:

- :func:`create_ca` makes a self-signed CA (``ca.crt`` + ``ca.key``);
- :func:`issue_server_cert` signs a TLS server certificate for the aggregator's host names
  and IP addresses (Flower SuperLink, OpenFL aggregator);
- :func:`issue_client_cert` signs a client certificate for a site (OpenFL collaborators use
  it for mutual TLS) and writes the same key pair in OpenSSH form (``<name>.auth`` /
  ``<name>.auth.pub``) for Flower's SuperNode authentication;
- :func:`verify_cert` checks a certificate against a CA (chain, validity, usage, host name).

Keys are EC P-384 (Flower node authentication accepts NIST curves only). Every private key
is written atomically with mode 0600; ``certs/.gitignore`` keeps them out of git.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsynth.commands import command, examples
from fedsynth.errors import FedsynthError
from fedsynth.io import atomic_path

CA_CERT = "ca.crt"
CA_KEY = "ca.key"


class CertificateError(FedsynthError):
    """A certificate or key is missing, unreadable, or does not verify."""


@dataclass(frozen=True)
class Issued:
    """Paths written for one identity (``auth_*`` only for client certificates)."""

    cert: Path
    key: Path
    auth_key: Path | None = None
    auth_pub: Path | None = None


# --------------------------------------------------------------------------- file helpers


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key atomically with mode 0600 (never world- or group-readable)."""
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _load_cert(path: Path) -> x509.Certificate:
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"certificate not found: {path}")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertificateError(f"{path} is not a PEM certificate ({err})") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"private key not found: {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"{path} is not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} holds a {type(key).__name__}; fedsynth CAs use EC keys")
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynth"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name in {"ca"}:
        raise CertificateError(f"invalid certificate name {name!r}: use a plain file stem such as 'site1' (not 'ca')")
    return name


# --------------------------------------------------------------------------- CA


def create_ca(out_dir: str | Path, common_name: str = "fedsynth federation CA", days: int = 3650,
              overwrite: bool = False) -> Issued:
    """Create a self-signed CA in ``out_dir`` (``ca.crt``, ``ca.key`` mode 0600)."""
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if not overwrite and (cert_path.exists() or key_path.exists()):
        raise CertificateError(f"a CA already exists in {out} ({CA_CERT}/{CA_KEY}); refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _dt.timedelta(minutes=5)).not_valid_after(_now() + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)


def _issue(ca_dir: Path, out_dir: Path, name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
           days: int) -> tuple[Issued, ec.EllipticCurvePrivateKey]:
    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    ca_cert, ca_key = _load_cert(ca_dir / CA_CERT), _load_key(ca_dir / CA_KEY)
    key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _dt.timedelta(minutes=5)).not_valid_after(_now() + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    cert = builder.sign(ca_key, hashes.SHA384())
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path), key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c in host for c in " /:@"):
        raise CertificateError(f"invalid host {host!r}: give a DNS name (aggregator.example.org) or an IP address")
    return x509.DNSName(host)


def issue_server_cert(ca_dir: str | Path, out_dir: str | Path, name: str, hosts: list[str], days: int = 825) -> Issued:
    """Sign a TLS server certificate ``<name>.crt``/``<name>.key`` valid for each host name or IP in ``hosts``."""
    if not hosts:
        raise CertificateError("a server certificate needs at least one --host (DNS name or IP address)")
    sans = [_san(h) for h in hosts]
    issued, _ = _issue(Path(ca_dir), Path(out_dir), _check_name(name), sans, ExtendedKeyUsageOID.SERVER_AUTH, days)
    return issued


def issue_client_cert(ca_dir: str | Path, out_dir: str | Path, name: str, days: int = 825) -> Issued:
    """Sign a client certificate for site ``name``; also write its key as OpenSSH files for Flower node auth."""
    _check_name(name)
    issued, key = _issue(Path(ca_dir), Path(out_dir), name, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH, days)
    auth_key, auth_pub = Path(out_dir) / f"{name}.auth", Path(out_dir) / f"{name}.auth.pub"
    _write_private(auth_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    _write_public(auth_pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n")
    return Issued(issued.cert, issued.key, auth_key, auth_pub)


# --------------------------------------------------------------------------- verification


def verify_cert(cert_path: str | Path, ca_cert_path: str | Path, host: str | None = None) -> dict[str, object]:
    """Verify ``cert_path`` against the CA: signature chain, validity period, key usage and, for
    server certificates with ``host``, that the host is in the certificate.

    Returns a summary; raises :class:`CertificateError` naming the reason when it does not verify.
    """
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    cert, ca = _load_cert(Path(cert_path)), _load_cert(Path(ca_cert_path))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    is_server = ExtendedKeyUsageOID.SERVER_AUTH in eku
    builder = PolicyBuilder().store(Store([ca])).time(_now())
    try:
        if is_server:
            subject = _san(host) if host else cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value[0]
            if isinstance(subject, x509.IPAddress):
                verifier = builder.build_server_verifier(x509.IPAddress(subject.value))
            else:
                verifier = builder.build_server_verifier(x509.DNSName(subject.value))
            verifier.verify(cert, [])
        else:
            builder.build_client_verifier().verify(cert, [])
    except VerificationError as err:
        raise CertificateError(f"{cert_path} does not verify against CA {ca_cert_path}: {err}") from None
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        "certificate": str(cert_path),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "kind": "server" if is_server else "client",
        "hosts": [str(v.value) for v in sans],
        "not_valid_after": cert.not_valid_after_utc.isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- CLI


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedsynth certs create-ca | issue-server | issue-client | verify``."""

    certs = subparsers.add_parser("certs", help="a small CA: create it, issue and verify certificates", **examples(
        "fedsynth certs create-ca -o ca", "fedsynth certs issue-server --ca ca -o server --host agg.example.org --host 10.0.0.5",
        "fedsynth certs issue-client --ca ca -o site1 --name site1", "fedsynth certs verify server/server.crt --ca ca"))
    sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    p = sub.add_parser("create-ca", help="create a CA (ca.crt, ca.key)", **examples(
        "fedsynth certs create-ca -o ca", "fedsynth certs create-ca -o ca --common-name \"Hospital federation CA\" --days 730"))
    p.add_argument("-o", "--output", required=True, help="CA folder")
    p.add_argument("--common-name", default="fedsynth federation CA", help="the CA's subject common name")
    p.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    p.add_argument("--force", action="store_true", help="overwrite an existing CA")
    p.set_defaults(command="certs create-ca")

    p = sub.add_parser("issue-server", help="sign a TLS server certificate for the aggregator", **examples(
        "fedsynth certs issue-server --ca ca -o server --host agg.example.org --host 10.0.0.5",
        "fedsynth certs issue-server --ca ca -o server --host 127.0.0.1 --name superlink"))
    p.add_argument("--ca", required=True, help="CA folder (ca.crt, ca.key)")
    p.add_argument("-o", "--output", required=True, help="folder for <name>.crt/<name>.key")
    p.add_argument("--name", default="server", help="file name stem of the certificate and key (default server)")
    p.add_argument("--host", action="append", required=True, help="DNS name or IP address (repeat)")
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.set_defaults(command="certs issue-server")

    p = sub.add_parser("issue-client", help="sign a client certificate (+ Flower node-auth key) for a site", **examples(
        "fedsynth certs issue-client --ca ca -o site1 --name site1"))
    p.add_argument("--ca", required=True, help="CA folder (ca.crt, ca.key)")
    p.add_argument("-o", "--output", required=True, help="folder for <name>.crt/.key/.auth/.auth.pub")
    p.add_argument("--name", required=True, help="site id, e.g. site1")
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.set_defaults(command="certs issue-client")

    p = sub.add_parser("verify", help="verify a certificate against a CA", **examples(
        "fedsynth certs verify server/server.crt --ca ca --host agg.example.org", "fedsynth certs verify site1/site1.crt --ca ca/ca.crt"))
    p.add_argument("certificate", help="certificate file (.crt) to check")
    p.add_argument("--ca", required=True, help="CA certificate file (ca.crt) or CA folder")
    p.add_argument("--host", default=None, help="for server certificates: the host name/IP to check")
    p.set_defaults(command="certs verify")

    @command("certs create-ca")
    def _create_ca(args: argparse.Namespace) -> None:
        issued = create_ca(args.output, args.common_name, args.days, overwrite=args.force)
        print(f"CA certificate: {issued.cert}\nCA private key: {issued.key} (mode 0600; keep it offline)")

    @command("certs issue-server")
    def _issue_server(args: argparse.Namespace) -> None:
        issued = issue_server_cert(args.ca, args.output, args.name, args.host, args.days)
        print(f"server certificate: {issued.cert} (hosts: {', '.join(args.host)})\nserver private key: {issued.key}")

    @command("certs issue-client")
    def _issue_client(args: argparse.Namespace) -> None:
        issued = issue_client_cert(args.ca, args.output, args.name, args.days)
        print(f"client certificate: {issued.cert}\nclient private key: {issued.key}\n"
              f"Flower node-auth key: {issued.auth_key} (public: {issued.auth_pub})")

    @command("certs verify")
    def _verify(args: argparse.Namespace) -> None:
        ca = Path(args.ca)
        info = verify_cert(args.certificate, ca / CA_CERT if ca.is_dir() else ca, args.host)
        print(f"OK: {info['certificate']} ({info['kind']}, hosts {info['hosts']}) is signed by {info['issuer']}, "
              f"valid until {info['not_valid_after']}")
