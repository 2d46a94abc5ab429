"""Who may call what: client tokens on the gateway, the internal token on recall and ranking,
TLS on the public port, the settings that refuse to run open, and no unpickling anywhere."""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.config import ClusterConfig
from cluster.ops import head_command
from gateway import server as gateway_server
from gateway.client import RecommenderClient
from protos.auth import AuthConfigError, TlsFiles, call_metadata, client_tokens, open_channel, tokens_from_file
from protos.recfunnel.v1 import ranking_pb2, ranking_pb2_grpc, recall_pb2, recall_pb2_grpc, recommender_pb2
from protos.recfunnel.v1 import recommender_pb2_grpc as rpc
from tests.grpc_checks import assert_health_and_reflection, serving_stack

CLIENT_TOKEN = "client-token-0123456789abcdef"
INTERNAL_TOKEN = "internal-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


def self_signed(folder: Path) -> TlsFiles:
    """A certificate for localhost and 127.0.0.1, signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256()))
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return TlsFiles(cert, key_file)


async def _code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_gateway_lets_in_only_valid_bearer_tokens(tiny_bundle: Path, tmp_path: Path) -> None:
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", internal_token=INTERNAL_TOKEN,
                             tokens=(CLIENT_TOKEN,)) as (gw, _, _):
        await assert_health_and_reflection(gw.address, gateway_server.SERVICE_NAME, CLIENT_TOKEN)
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = rpc.RecommenderStub(channel)
            request = recommender_pb2.RecommendRequest(user_id="u1", k=3)
            feedback = recommender_pb2.FeedbackRequest(events=[recommender_pb2.Event(user_id="u1", item_id="i1")])
            for metadata in [(), call_metadata("not-the-token-0123456789"), (("authorization", CLIENT_TOKEN),)]:
                assert await _code_of(stub.Recommend(request, metadata=metadata, timeout=5)) \
                    == grpc.StatusCode.UNAUTHENTICATED
                assert await _code_of(stub.Feedback(feedback, metadata=metadata, timeout=5)) \
                    == grpc.StatusCode.UNAUTHENTICATED
            assert gw.events.count() == 0  # a refused call writes nothing
            reply = await stub.Recommend(request, metadata=call_metadata(CLIENT_TOKEN), timeout=5)
            assert len(reply.items) == 3 and not reply.degraded  # the gateway's internal calls got through
            assert (await stub.Feedback(feedback, metadata=call_metadata(CLIENT_TOKEN), timeout=5)).accepted == 1


async def test_recall_and_ranking_refuse_calls_without_the_internal_token(tiny_bundle: Path,
                                                                          tmp_path: Path) -> None:
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", internal_token=INTERNAL_TOKEN,
                             num_shards=1) as (_, shards, ranking), \
            grpc.aio.insecure_channel(shards[0].address) as recall_channel, \
            grpc.aio.insecure_channel(ranking.address) as ranking_channel:
        recall = recall_pb2_grpc.RecallStub(recall_channel)
        ranker = ranking_pb2_grpc.RankingStub(ranking_channel)
        info, encode = recall_pb2.ShardInfoRequest(), ranking_pb2.EncodeRequest(history_item_ids=["i1"])
        for metadata in [(), call_metadata(CLIENT_TOKEN)]:  # a client's token is not the internal one
            assert await _code_of(recall.ShardInfo(info, metadata=metadata, timeout=5)) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert await _code_of(ranker.Encode(encode, metadata=metadata, timeout=5)) \
                == grpc.StatusCode.UNAUTHENTICATED
        assert await _code_of(recall.ShardInfo(info, metadata=call_metadata(INTERNAL_TOKEN), timeout=5)) \
            == grpc.StatusCode.OK


async def test_public_port_speaks_tls_with_the_configured_certificate(tiny_bundle: Path, tmp_path: Path) -> None:
    tls = self_signed(tmp_path)
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", internal_token=INTERNAL_TOKEN,
                             tokens=(CLIENT_TOKEN,), tls=tls) as (gw, _, _):
        request = recommender_pb2.RecommendRequest(user_id="u1", k=2)
        async with open_channel(gw.address, tls_ca=tls.cert) as channel:
            reply = await rpc.RecommenderStub(channel).Recommend(request, metadata=call_metadata(CLIENT_TOKEN),
                                                                  timeout=5)
            assert len(reply.items) == 2
        client = RecommenderClient(gw.address, timeout=5, token=CLIENT_TOKEN, tls_ca=tls.cert)
        try:
            assert len((await client.recommend("u1", k=3)).items) == 3
            assert await client.feedback([("u1", "i1", "click", 1.0)]) == 1
        finally:
            await client.close()
        async with grpc.aio.insecure_channel(gw.address) as plain:  # plaintext never reaches the service
            assert await _code_of(rpc.RecommenderStub(plain).Recommend(
                request, metadata=call_metadata(CLIENT_TOKEN), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_tokens_come_from_files_or_the_environment_and_must_be_long(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "tokens"
    good.write_text(f"# clients\n{CLIENT_TOKEN}\n\n{INTERNAL_TOKEN}\n")
    assert tokens_from_file(good) == (CLIENT_TOKEN, INTERNAL_TOKEN)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        tokens_from_file(short)
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(AuthConfigError, match="holds no token"):
        tokens_from_file(tmp_path / "empty")
    monkeypatch.setenv("RECFUNNEL_TOKENS", f"{CLIENT_TOKEN}, {INTERNAL_TOKEN}")
    assert client_tokens(None) == (CLIENT_TOKEN, INTERNAL_TOKEN)


def test_standalone_services_refuse_to_start_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from ranking import server as ranking_server
    from retrieval import server as recall_server

    monkeypatch.delenv("RECFUNNEL_TOKENS", raising=False)
    monkeypatch.delenv("RECFUNNEL_INTERNAL_TOKEN", raising=False)
    for main, argv in [(gateway_server.main, ["--recall", "127.0.0.1:1", "--ranking", "127.0.0.1:2"]),
                       (recall_server.main, ["--bundle", str(tmp_path)]),
                       (ranking_server.main, ["--bundle", str(tmp_path)])]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert "--no-auth" in capsys.readouterr().err


def test_cluster_config_names_secret_files_never_secrets(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(CLIENT_TOKEN + "\n")
    settings = tmp_path / "cluster.toml"
    settings.write_text(f'bundle = "b"\ndb_path = "d"\ntokens_file = "{tokens}"\n')
    config = ClusterConfig.from_file(settings)
    assert config.tokens == (CLIENT_TOKEN,)
    assert len(config.internal_token) >= 32  # random per cluster when the file names none
    assert config.internal_token != ClusterConfig.from_file(settings).internal_token
    assert CLIENT_TOKEN not in repr(config) and config.internal_token not in repr(config)
    settings.write_text(f'bundle = "b"\ndb_path = "d"\ntokens = ["{CLIENT_TOKEN}"]\n')
    with pytest.raises(ValueError, match="unknown settings"):
        ClusterConfig.from_file(settings)


def test_ray_dashboard_binds_to_loopback() -> None:
    assert "--dashboard-host=127.0.0.1" in head_command()


def test_nothing_is_unpickled() -> None:
    """Bundles are safetensors and JSON, the wire is protobuf: no pickle, no torch.load."""
    unpickling = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\(|allow_pickle=True|\bjoblib\b")
    packages = ["protos", "recdata", "retrieval", "ranking", "gateway", "cluster"]
    offenders = [str(path.relative_to(REPO)) for package in packages for path in (REPO / package).rglob("*.py")
                 if unpickling.search(path.read_text("utf-8"))]
    assert offenders == []
