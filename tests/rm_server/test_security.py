"""Auth and transport: bearer tokens, TLS, mTLS, and a plaintext health port beside TLS."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2

from rm_client import RewardClient, ScoringError, TLSConfig, text_sample
from rm_server.launch import health_status, start_server

TOKEN = "s3cret-token-value-42"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs; a server cert for localhost/127.0.0.1 and a client cert from each CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca1", "ca2"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca, ext in (("server", "ca1", ["-extfile", "san.ext"]), ("client1", "ca1", []),
                          ("client2", "ca2", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)
    return d


def sample():
    return [text_sample("s", "the movie", " was great")]


def test_bearer_token(rm_dirs, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    s = start_server(rm_dirs["llama"], "--auth-token-file", str(token_file))
    try:
        assert health_status(s.address) == health_pb2.HealthCheckResponse.SERVING  # exempt
        for token in (None, "wrong", TOKEN[:-1]):
            with RewardClient(s.address, token=token, max_attempts=1) as rm:
                with pytest.raises(ScoringError) as exc:
                    rm.score(sample())
                assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
        with RewardClient(s.address, token=TOKEN) as rm:
            assert rm.score(sample())[0].id == "s"
    finally:
        assert s.stop() == 0
    assert TOKEN not in s.log()  # secrets never reach the logs


def test_tls_and_plaintext_health_port(rm_dirs, pki):
    s = start_server(rm_dirs["llama"], "--tls-cert", str(pki / "server.pem"),
                     "--tls-key", str(pki / "server.key"), "--health-port", "0")
    try:
        assert health_status(f"127.0.0.1:{s.health_port}") == health_pb2.HealthCheckResponse.SERVING
        with RewardClient(s.address, tls=TLSConfig(ca_cert=str(pki / "ca1.pem"))) as rm:
            assert rm.score(sample())[0].id == "s"
        with RewardClient(s.address, max_attempts=1, timeout=5) as rm:  # plaintext to TLS
            with pytest.raises(ScoringError):
                rm.score(sample())
        with RewardClient(s.address, tls=TLSConfig(ca_cert=str(pki / "ca2.pem")),
                          max_attempts=1, timeout=5) as rm:  # server cert from an unknown CA
            with pytest.raises(ScoringError):
                rm.score(sample())
    finally:
        assert s.stop() == 0


def test_mtls_requires_a_client_cert_from_the_trusted_ca(rm_dirs, pki):
    s = start_server(rm_dirs["llama"], "--tls-cert", str(pki / "server.pem"),
                     "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca1.pem"),
                     "--health-port", "0")
    ca = str(pki / "ca1.pem")
    try:
        good = TLSConfig(ca, str(pki / "client1.pem"), str(pki / "client1.key"))
        with RewardClient(s.address, tls=good) as rm:
            assert rm.score(sample())[0].id == "s"
        other_client = TLSConfig(ca, str(pki / "client2.pem"), str(pki / "client2.key"))
        for tls in (TLSConfig(ca), other_client):
            with RewardClient(s.address, tls=tls, max_attempts=1, timeout=5) as rm:
                with pytest.raises(ScoringError):
                    rm.score(sample())
    finally:
        assert s.stop() == 0
