"""TLS, mutual TLS and bearer-token auth with tritonclient; gRPC reflection listing the services;
the CLI's flag checks. Certificates are made at test time with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tritonclient.utils import InferenceServerException  # noqa: E402

from pyserve.server import ServerThread  # noqa: E402
from pyserve.server.interceptors import read_token_file  # noqa: E402
from test_server_grpc import expect_error, fp32_input  # noqa: E402

ECHO = "backend: test-echo\n"


# --- certificates ----------------------------------------------------------------------------------


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_cn, key, issuer_cert=None, issuer_key=None, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(subject_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """PEM files: ca, server (localhost / 127.0.0.1, signed by ca), client (signed by ca), rogue
    client (signed by another CA)."""
    d = tmp_path_factory.mktemp("pki")
    out = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("pyserve test CA", ca_key, ca=True)
    out["ca"] = _write(d / "ca.pem", cert=ca)
    for who, issuer, issuer_key in (("server", ca, ca_key), ("client", ca, ca_key)):
        key = ec.generate_private_key(ec.SECP256R1())
        out[f"{who}_key"] = _write(d / f"{who}.key", key=key)
        out[f"{who}_cert"] = _write(d / f"{who}.pem", cert=_cert(who, key, issuer, issuer_key, server=who == "server"))
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _cert("rogue CA", rogue_ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    out["rogue_key"] = _write(d / "rogue.key", key=key)
    out["rogue_cert"] = _write(d / "rogue.pem", cert=_cert("rogue", key, rogue_ca, rogue_ca_key))
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, write_model):
    d = tmp_path_factory.mktemp("secrepo")
    write_model(d, "echo", 1, echo_mode="echo", config=ECHO)
    return d


def _ok(client) -> bool:
    x = np.full((1, 2), 4.0, np.float32)
    return np.array_equal(client.infer("echo", [fp32_input(x)], client_timeout=20).as_numpy("y"), 2 * x)


# --- TLS ---------------------------------------------------------------------------------------------


def test_tls_serves_tls_clients_only(repo, pki):
    with ServerThread(repo, host="127.0.0.1", grpc_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"]) as s:
        url = f"localhost:{s.bound_port}"
        c = tc.InferenceServerClient(url, ssl=True, root_certificates=pki["ca"])
        assert c.is_server_ready() and _ok(c)
        c.close()
        plain = tc.InferenceServerClient(url)
        expect_error(lambda: plain.is_server_live(client_timeout=5), "UNAVAILABLE")
        plain.close()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(repo, pki):
    with ServerThread(repo, host="127.0.0.1", grpc_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                      tls_client_ca=pki["ca"]) as s:
        url = f"localhost:{s.bound_port}"
        good = tc.InferenceServerClient(url, ssl=True, root_certificates=pki["ca"], private_key=pki["client_key"],
                                        certificate_chain=pki["client_cert"])
        assert _ok(good)
        good.close()
        for extra in ({}, {"private_key": pki["rogue_key"], "certificate_chain": pki["rogue_cert"]}):
            bad = tc.InferenceServerClient(url, ssl=True, root_certificates=pki["ca"], **extra)
            expect_error(lambda: bad.is_server_live(client_timeout=5), "UNAVAILABLE")
            bad.close()


def test_tls_arguments_are_checked(repo, pki, tmp_path):
    with pytest.raises(ValueError, match="tls_cert and tls_key go together; got only tls_cert"):
        ServerThread(repo, tls_cert=pki["server_cert"])
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert and tls_key"):
        ServerThread(repo, tls_client_ca=pki["ca"])
    with pytest.raises(ValueError, match="tls_key: cannot read"):
        ServerThread(repo, tls_cert=pki["server_cert"], tls_key=tmp_path / "nope.key")
    (tmp_path / "junk.pem").write_text("not pem")
    with pytest.raises(ValueError, match="tls_cert: .* is not a PEM file"):
        ServerThread(repo, tls_cert=tmp_path / "junk.pem", tls_key=pki["server_key"])
    # certificate and key swapped: gRPC itself only reported "Failed to bind to address"
    with pytest.raises(ValueError, match="tls_cert: .* holds no CERTIFICATE block"):
        ServerThread(repo, tls_cert=pki["server_key"], tls_key=pki["server_cert"])
    with pytest.raises(ValueError, match="tls_client_ca: .* holds no CERTIFICATE block"):
        ServerThread(repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["server_key"])


# --- bearer tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authed(repo, grpc_engine):
    s = ServerThread(repo, host="127.0.0.1", grpc_port=0, auth_tokens=["s3cret-token", "rotated-token"],
                     grpc_engine=grpc_engine).start()
    yield s
    s.stop()


def test_token_auth_refuses_missing_and_wrong_tokens(authed):
    c = tc.InferenceServerClient(authed.url)
    x = [fp32_input(np.ones((1, 2), np.float32))]
    for headers, why in ((None, "missing 'authorization: Bearer <token>' metadata"),
                         ({"authorization": "Bearer nope"}, "invalid bearer token"),
                         ({"authorization": "Basic s3cret-token"}, "must be 'Bearer <token>'")):
        expect_error(lambda: c.infer("echo", x, headers=headers), "UNAUTHENTICATED", why)
        expect_error(lambda: c.get_model_metadata("echo", headers=headers), "UNAUTHENTICATED", why)
        expect_error(lambda: c.is_server_live(headers=headers), "UNAUTHENTICATED")
        expect_error(lambda: c.get_model_repository_index(headers=headers), "UNAUTHENTICATED")
    for token in ("s3cret-token", "rotated-token"):
        h = {"authorization": f"Bearer {token}"}
        r = c.infer("echo", x, headers=h)
        assert np.array_equal(r.as_numpy("y"), [[2.0, 2.0]])
        assert c.is_server_ready(headers=h)
    c.close()


def test_token_auth_on_streams(authed):
    import queue

    results: queue.Queue = queue.Queue()
    c = tc.InferenceServerClient(authed.url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:  # the server may end the stream before the request is even written
        c.async_stream_infer("echo", [fp32_input(np.ones((1, 2), np.float32))])
    except InferenceServerException:
        pass
    _, error = results.get(timeout=20)
    assert error is not None and "UNAUTHENTICATED" in str(error.status())
    c.stop_stream()
    c.start_stream(callback=lambda result, error: results.put((result, error)),
                   headers={"authorization": "Bearer s3cret-token"})
    c.async_stream_infer("echo", [fp32_input(np.full((1, 2), 3.0, np.float32))])
    result, error = results.get(timeout=20)
    assert error is None and np.array_equal(result.as_numpy("y"), [[6.0, 6.0]])
    c.stop_stream()
    c.close()


def test_health_checks_need_no_token(authed):
    with grpc.insecure_channel(authed.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_read_token_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\n\n  alpha  \nbeta\n")
    assert read_token_file(f) == ("alpha", "beta")
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_token_file(f)
    f.write_text("two words\n")
    with pytest.raises(ValueError, match="line 1: a token must not contain whitespace"):
        read_token_file(f)
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(tmp_path / "missing")


# --- reflection -------------------------------------------------------------------------------------------


def test_reflection_lists_and_describes_the_services(authed, server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert server.server.reflection_enabled
    with grpc.insecure_channel(server.url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert services == {"inference.GRPCInferenceService", "pyserve.v1.TrafficControl", "grpc.health.v1.Health",
                            "grpc.reflection.v1alpha.ServerReflection"}
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("inference.GRPCInferenceService")
        methods = {m.name for m in svc.methods}
        assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                "RepositoryModelUnload"} <= methods
        infer = svc.methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert "raw_input_contents" in infer.input_type.fields_by_name
        # the config message comes from model_config.proto, a dependency served too
        cfg = pool.FindMessageTypeByName("inference.ModelConfig")
        assert "version_policy" in cfg.fields_by_name
        traffic = pool.FindServiceByName("pyserve.v1.TrafficControl")
        assert {"SetWeights", "Promote", "Rollback", "Feedback", "Report", "Status"} <= {m.name for m in traffic.methods}
        assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
    # reflection is behind the token like every RPC but health
    with grpc.insecure_channel(authed.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- CLI ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "a.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "{d}/none.pem", "--tls-key", "{d}/none.key"], "--tls-cert: cannot read"),
        (["--auth-token-file", "{d}/empty"], "--auth-token-file: auth token file"),
        (["--max-message-mb", "4", "--max-message-bytes", "100"], "give --max-message-mb or --max-message-bytes"),
        (["--max-message-bytes", "0"], "--max-message-bytes must be in 1..2147483647"),
        (["--model-control-mode", "poll", "--repository-poll-s", "0"], "--repository-poll-s must be > 0"),
        (["--repository-poll-s", "5"], "--repository-poll-s needs --model-control-mode poll"),
    ],
)
def test_cli_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    from pyserve.cli.main import main

    (tmp_path / "empty").write_text("\n")
    flags = [f.format(d=tmp_path) for f in flags]
    assert main(["serve", "--model-repository", str(tmp_path), "--grpc-port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("pyserve serve: error:")


@pytest.mark.parametrize("client", ["tritonclient", "pyserve"])
def test_infer_cli_sends_the_token_of_auth_token_file(authed, tmp_path, capsys, client):
    """`pyserve infer --auth-token-file` against a token-protected server: answers with the token
    (values checked against the echo model), UNAUTHENTICATED with a wrong one, exit 2 without."""
    from pyserve.cli.main import main

    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("# rotated weekly\nrotated-token\n")
    bad.write_text("wrong-token\n")
    base = ["infer", "--url", authed.url, "--model", "echo", "--input", str(tmp_path / "x.npy"), "--client", client]
    assert main([*base, "--auth-token-file", str(good), "--output", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), 2 * x)  # the test echo model doubles its input
    capsys.readouterr()
    assert main([*base, "--auth-token-file", str(bad)]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(base) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*base, "--auth-token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_traffic_cli_sends_the_token_of_auth_token_file(authed, tmp_path, capsys):
    from pyserve.cli.main import main

    good = tmp_path / "good"
    good.write_text("s3cret-token\n")
    assert main(["traffic", "status", "--url", authed.url]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["traffic", "status", "--json", "--url", authed.url, "--auth-token-file", str(good)]) == 0
    assert '"routes"' in capsys.readouterr().out


# --- client commands over TLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls(repo, pki, grpc_engine):
    s = ServerThread(repo, host="127.0.0.1", grpc_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                     tls_client_ca=pki["ca"], grpc_engine=grpc_engine).start()
    yield s
    s.stop()


@pytest.mark.parametrize("client", ["tritonclient", "pyserve"])
def test_infer_cli_over_mutual_tls(mtls, pki, tmp_path, capsys, client):
    """`pyserve infer --tls-ca --tls-cert --tls-key` against a mutual-TLS server: the answer equals
    the echo model's 2x; without a client certificate, or in plaintext, one line and exit 2."""
    from pyserve.cli.main import main

    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    base = ["infer", "--url", f"localhost:{mtls.bound_port}", "--model", "echo", "--input", str(tmp_path / "x.npy"),
            "--client", client, "--timeout-s", "10"]
    assert main([*base, "--tls-ca", pki["ca"], "--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"],
                 "--output", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), 2 * x)
    capsys.readouterr()
    for flags in (["--tls-ca", pki["ca"]], []):  # no client certificate; plaintext
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pyserve infer: error: UNAVAILABLE"), err
        assert ("pass --tls-ca" in err[0]) == (not flags), err  # the hint only for a plaintext call


def test_traffic_cli_over_tls(repo, pki, capsys):
    from pyserve.cli.main import main

    with ServerThread(repo, host="127.0.0.1", grpc_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"]) as s:
        url = f"localhost:{s.bound_port}"
        assert main(["traffic", "status", "--json", "--url", url, "--tls-ca", pki["ca"]]) == 0
        assert '"routes"' in capsys.readouterr().out
        assert main(["traffic", "status", "--url", url, "--timeout-s", "10"]) == 2  # plaintext to a TLS port
        err = capsys.readouterr().err
        assert "UNAVAILABLE" in err and "pass --tls-ca" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "{client_cert}"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "{client_cert}", "--tls-key", "{client_key}"], "--tls-cert/--tls-key need --tls-ca"),
        (["--tls-ca", "{d}/missing.pem"], "--tls-ca: cannot read"),
        (["--tls-ca", "{d}/junk.pem"], "--tls-ca: '{d}/junk.pem' is not a PEM file"),
        (["--tls-ca", "{ca}", "--tls-cert", "{d}/junk.pem", "--tls-key", "{client_key}"], "--tls-cert: '{d}/junk.pem' is not a PEM"),
        # swapped: grpc only failed the handshake ("Failed to create security handshaker")
        (["--tls-ca", "{ca}", "--tls-cert", "{client_key}", "--tls-key", "{client_cert}"],
         "--tls-key: '{client_cert}' holds no PRIVATE KEY block (expected a private key)"),
        (["--tls-ca", "{client_key}"], "--tls-ca: '{client_key}' holds no CERTIFICATE block"),
    ],
)
@pytest.mark.parametrize("command", ["infer", "traffic"])
def test_client_tls_flag_errors_are_one_line(pki, tmp_path, capsys, flags, message, command):
    from pyserve.cli.main import main

    (tmp_path / "junk.pem").write_text("not pem")
    np.save(tmp_path / "x.npy", np.zeros((1, 2), np.float32))
    fmt = dict(pki, d=str(tmp_path))
    flags = [f.format(**fmt) for f in flags]
    argv = (["infer", "--url", "localhost:1", "--model", "echo", "--input", str(tmp_path / "x.npy")]
            if command == "infer" else ["traffic", "status", "--url", "localhost:1"])
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(**fmt) in err[0], err
