"""The load-testing kit: the request mix, open-loop arrivals, the report and its PNG, against
a gateway that wants a token over TLS, as a deployment outside the demo would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.harness import open_loop
from bench.loadtest import LoadTest, Mix, report, run_load
from bench.plots import plot_latency
from cluster.cli import app
from protos.recfunnel.v1 import recommender_pb2
from recdata.dataset import Dataset
from tests.grpc_checks import serving_stack
from tests.test_security import CLIENT_TOKEN, INTERNAL_TOKEN, self_signed


def test_mix_draws_every_kind_by_weight(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text("u1\nu2\n\n")
    settings = tmp_path / "mix.toml"
    settings.write_text('k = 5\nusers_file = "users.txt"\nitems = ["a", "b", "c"]\n'
                        '[weights]\nknown_exclude = 1\nfeedback = 1\nunknown_context = 2\n')
    mix = Mix.from_file(settings)
    assert mix.users == ("u1", "u2") and mix.k == 5
    requests = mix.requests(2000, seed=1)
    feedback = [r for r in requests if isinstance(r, recommender_pb2.FeedbackRequest)]
    known = [r for r in requests if isinstance(r, recommender_pb2.RecommendRequest) and r.user_id in mix.users]
    visitors = [r for r in requests if isinstance(r, recommender_pb2.RecommendRequest) and r not in known]
    assert 0.2 < len(feedback) / 2000 < 0.3 and 0.45 < len(visitors) / 2000 < 0.55
    assert all(r.exclude_item_ids and not r.context_item_ids for r in known)
    assert all(r.context_item_ids and not r.exclude_item_ids for r in visitors)
    assert len({r.events[0].event_id for r in feedback}) == len(feedback)  # one idempotency key each
    settings.write_text('users = ["u"]\nitems = ["i"]\n[weights]\nbrowse = 1\n')
    with pytest.raises(ValueError, match="unknown request kinds"):
        Mix.from_file(settings)


async def test_arrivals_are_open_loop_and_latency_counts_from_the_schedule() -> None:
    """A slow answer delays nothing else: 40 requests at 200/s finish in about 0.2 s plus one
    answer time, and every latency includes the full 0.1 s the call took."""
    import asyncio

    async def slow(_: object) -> bool:
        await asyncio.sleep(0.1)
        return False

    result = await open_loop(slow, [recommender_pb2.RecommendRequest()], rate=200, seconds=0.2, seed=0)
    assert 20 <= len(result.samples) <= 70
    assert result.wall_s < 0.2 + 0.1 + 0.15
    assert min(result.latencies_ms) >= 100


async def test_loadtest_against_a_gateway_with_token_and_tls(tiny_bundle: Path, tiny_dataset: Dataset,
                                                            tmp_path: Path) -> None:
    tls = self_signed(tmp_path)
    mix = Mix(tuple(tiny_dataset.user_ids), tuple(tiny_dataset.item_ids), k=5)
    async with serving_stack(tiny_bundle, tmp_path / "events.sqlite", internal_token=INTERNAL_TOKEN,
                             tokens=(CLIENT_TOKEN,), tls=tls) as (gw, _, _):
        port = gw.address.rsplit(":", 1)[1]
        test = LoadTest(target=f"localhost:{port}", qps=25, duration_s=3, token=CLIENT_TOKEN, tls_ca=tls.cert,
                        timeout_s=5, warmup_s=0.5)
        result = await run_load(test, mix)
        refused = await run_load(LoadTest(target=test.target, qps=10, duration_s=1, tls_ca=tls.cert,
                                          warmup_s=0), mix)
        feedback_logged = gw.events.count()
    summary = report(test, result)
    assert summary["errors"] == {} and summary["requests"] >= 40
    assert set(summary["by_kind"]) == {"Recommend", "Feedback"}
    assert summary["by_kind"]["Feedback"]["requests"] <= feedback_logged  # the warm-up also sent some
    for key in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "achieved_rps", "degraded_share"):
        assert summary[key] >= 0
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["p99.9_ms"]
    assert set(report(test, refused)["errors"]) == {"UNAUTHENTICATED"}  # no token: every call refused
    png = plot_latency(result, tmp_path / "load.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loadtest_command_rejects_a_bad_mix_before_sending(tmp_path: Path) -> None:
    bad = tmp_path / "mix.json"
    bad.write_text(json.dumps({"users": [], "items": ["i"]}))
    result = CliRunner().invoke(app, ["loadtest", "--target", "127.0.0.1:9", "--mix", str(bad), "--json"])
    assert result.exit_code == 2 and "at least one user id" in result.output
