"""An external client over mutual TLS with a bearer token: Python grpcio with
ssl_channel_credentials (client certificate) and call credentials (a JWT),
as a user's own program would. Certificates and the token are made here."""
import base64
import datetime
import hashlib
import hmac
import json
import os
import subprocess
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import _binary
from test_external_client import _dynamic, _method

SECRET = "python-client-hs256-secret-32-bytes!!"


def _cert(name, sans, issuer=None, ca=False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert, key, pem, key_pem


def _jwt(claims):
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(SECRET.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


@pytest.fixture
def tls_service(tmp_path):
    ca_cert, ca_key, ca_pem, _ = _cert("python test CA", [], ca=True)
    _, _, server_pem, server_key = _cert("server", ["localhost"], issuer=(ca_cert, ca_key))
    _, _, client_pem, client_key = _cert("client", ["py.client.test"], issuer=(ca_cert, ca_key))
    for name, data in [("ca.pem", ca_pem), ("server.pem", server_pem), ("server.key", server_key)]:
        (tmp_path / name).write_bytes(data)
    ports = tmp_path / "ports.json"
    log = open(tmp_path / "service.log", "wb")
    settings = [
        f"Tls:CertificatePath={tmp_path / 'server.pem'}", f"Tls:KeyPath={tmp_path / 'server.key'}",
        f"Tls:ClientCaPath={tmp_path / 'ca.pem'}",
        "Auth:Jwt:Algorithm=HS256", "Auth:Jwt:Secret=secret:env:PY_TEST_JWT_SECRET",
        "Auth:Jwt:Audience=workmanager",
    ]
    args = [_binary(), "serve", "--http-port", "0", "--grpc-port", "0",
            "--state-path", str(tmp_path / "state.redb"), "--port-file", str(ports)]
    for s in settings:
        args += ["--set", s]
    proc = subprocess.Popen(args, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PY_TEST_JWT_SECRET": SECRET})
    deadline = time.time() + 30
    while not ports.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("workmanager did not start: " + (tmp_path / "service.log").read_text())
        time.sleep(0.02)
    port = json.loads(ports.read_text())["grpc"]
    yield f"localhost:{port}", ca_pem, client_pem, client_key
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _channel(target, ca_pem, client_pem=None, client_key=None, token=None):
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=client_key,
                                         certificate_chain=client_pem)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, creds)


def test_mtls_and_bearer_token_create_and_list(tls_service):
    target, ca_pem, client_pem, client_key = tls_service
    token = _jwt({"sub": "py-admin", "aud": "workmanager", "exp": int(time.time()) + 600, "roles": ["admin"]})
    deadline = time.time() + 30
    while True:
        try:
            with _channel(target, ca_pem, client_pem, client_key, token) as channel:
                grpc.channel_ready_future(channel).result(timeout=5)
                _, pool = _dynamic(channel)
                list_req, list_workers = _method(channel, pool, "ListWorkers")
                list_workers(list_req())
                break
        except (grpc.RpcError, grpc.FutureTimeoutError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    with _channel(target, ca_pem, client_pem, client_key, token) as channel:
        _, pool = _dynamic(channel)
        create_req, create_worker = _method(channel, pool, "CreateWorker")
        req = create_req()
        req.code_source.content = b"def Process(event):\n    return {'type': 'out', 'data': event['data']}\n"
        req.mime_type = "text/x-python"
        req.topics.append("prices")
        worker_id = create_worker(req).id
        list_req, list_workers = _method(channel, pool, "ListWorkers")
        assert [w.id for w in list_workers(list_req()).workers] == [worker_id]

    # The same certificate without the token: UNAUTHENTICATED (reflection
    # itself needs the viewer role).
    with _channel(target, ca_pem, client_pem, client_key) as channel:
        with pytest.raises(grpc.RpcError) as e:
            _, pool = _dynamic(channel)
            _method(channel, pool, "ListWorkers")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # No client certificate: the handshake fails.
    with _channel(target, ca_pem, token=token) as channel:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)
