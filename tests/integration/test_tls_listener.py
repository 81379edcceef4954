"""A TLS listener: ``[cookie] secure = auto`` marks the cookie Secure, and only there."""

from __future__ import annotations

import datetime
import http.client
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .harness import Launcher, http_get, proxy_config


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway key and certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def https_set_cookies(port: int) -> list[str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        return response.headers.get_all("Set-Cookie") or []
    finally:
        connection.close()


def test_secure_auto_sets_secure_and_samesite_none_over_a_tls_listener_only(
    launch: Launcher, tmp_path: Path
) -> None:
    key, cert = self_signed(tmp_path)
    backends = launch.backends(["s1"])
    cookie = {"secure": "auto", "samesite": "None", "samesite_legacy": "true"}
    tls = launch.stickyproxy(
        proxy_config(
            backends,
            proxy={
                "listen": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
                "proxy_protocol": "off",
            },
            cookie=cookie,
        )
    )
    assert https_set_cookies(tls.port) == [
        "storify_editor_host=s1; path=/; Secure; SameSite=None",
        "storify_editor_host_legacy=s1; path=/; Secure",
    ]
    plain = launch.stickyproxy(
        proxy_config(backends, proxy={"proxy_protocol": "off"}, cookie=cookie)
    )
    assert http_get(plain.port, "/").headers.get_all("Set-Cookie") == [
        "storify_editor_host=s1; path=/"
    ]
