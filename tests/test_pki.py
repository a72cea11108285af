"""The small CA: create, issue, verify; private keys 0600; CLI round trip."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from fedsynth import pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_server_client_verify(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path / "ca")
    server = pki.issue_server_cert(tmp_path / "ca", tmp_path / "agg", "server", ["127.0.0.1", "aggregator.example.org"])
    client = pki.issue_client_cert(tmp_path / "ca", tmp_path / "site1", "site1")
    for key in (ca.key, server.key, client.key, client.auth_key):
        assert key is not None and _mode(key) == 0o600, key
    assert _mode(server.cert) == 0o644

    info = pki.verify_cert(server.cert, ca.cert, host="127.0.0.1")
    assert info["kind"] == "server" and "127.0.0.1" in info["hosts"]
    pki.verify_cert(server.cert, ca.cert, host="aggregator.example.org")
    assert pki.verify_cert(client.cert, ca.cert)["kind"] == "client"

    # the certificate and key load into a real TLS context (what gRPC/OpenFL do)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server.cert, server.key)

    with pytest.raises(pki.CertificateError, match="does not verify"):
        pki.verify_cert(server.cert, ca.cert, host="10.0.0.9")

    # the node-auth key is an OpenSSH EC key Flower can load
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    assert load_ssh_private_key(client.auth_key.read_bytes(), None).curve.name == "secp384r1"  # type: ignore[union-attr]
    load_ssh_public_key(client.auth_pub.read_bytes())


def test_other_ca_is_rejected(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "ca")
    pki.create_ca(tmp_path / "rogue")
    rogue = pki.issue_client_cert(tmp_path / "rogue", tmp_path / "out", "site9")
    with pytest.raises(pki.CertificateError, match="does not verify"):
        pki.verify_cert(rogue.cert, tmp_path / "ca" / "ca.crt")
    with pytest.raises(pki.CertificateError, match="already exists"):
        pki.create_ca(tmp_path / "ca")
    with pytest.raises(pki.CertificateError, match="invalid host"):
        pki.issue_server_cert(tmp_path / "ca", tmp_path / "out", "server", ["bad host"])
    with pytest.raises(pki.CertificateError, match="not found"):
        pki.issue_client_cert(tmp_path / "missing", tmp_path / "out", "site1")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsynth.cli import main

    ca = tmp_path / "ca"
    assert main(["certs", "create-ca", "-o", str(ca)]) == 0
    assert main(["certs", "issue-server", "--ca", str(ca), "-o", str(tmp_path), "--host", "127.0.0.1"]) == 0
    assert main(["certs", "issue-client", "--ca", str(ca), "-o", str(tmp_path), "--name", "site1"]) == 0
    assert main(["certs", "verify", str(tmp_path / "server.crt"), "--ca", str(ca), "--host", "127.0.0.1"]) == 0
    assert main(["certs", "verify", str(tmp_path / "site1.crt"), "--ca", str(ca / "ca.crt")]) == 0
    assert "OK:" in capsys.readouterr().out
    pki.create_ca(tmp_path / "other")
    assert main(["certs", "verify", str(tmp_path / "site1.crt"), "--ca", str(tmp_path / "other")]) == 2
    assert "does not verify" in capsys.readouterr().err
