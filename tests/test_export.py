"""`recfunnel export`: Ray Data scores every user as Recommend would, to one Parquet file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bench.in_process import in_process_funnel
from cluster.cli import app
from gateway.events import Event, EventLog
from gateway.funnel import RecommendQuery
from recdata.bundle import read_manifest


@pytest.fixture
def event_log(tmp_path: Path) -> Path:
    log = EventLog(tmp_path / "events.sqlite")
    log.append([Event(f"u{u}", f"i{(u * 7 + n) % 200}", timestamp_ms=n + 1) for u in range(30) for n in range(6)])
    log.append([Event("u0", "i3", "hide"), Event("u1", "i150", "hide")])
    log.close()
    return tmp_path / "events.sqlite"


def test_export_gives_every_user_the_answer_recommend_gives(tiny_bundle: Path, event_log: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "recs.parquet"
    users = tmp_path / "users.txt"
    users.write_text("u0\nu1\nu2\nu17\nstranger\n")
    result = CliRunner().invoke(app, ["export", "--bundle", str(tiny_bundle), "--db", str(event_log),
                                      "--users", str(users), "--k", "10", "--out", str(out), "--actors", "1",
                                      "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["users"] == 5 and report["rows"] == 50
    rows = pq.read_table(out).to_pylist()
    served = in_process_funnel(tiny_bundle, num_shards=2, device="cpu",
                               channel_budgets=dict(read_manifest(tiny_bundle)["candidates_per_channel"]))
    log = EventLog(event_log)
    for user in ("u0", "u1", "u2", "u17", "stranger"):
        exported = sorted((r for r in rows if r["user_id"] == user), key=lambda r: r["rank"])
        answer = asyncio.run(served.recommend(RecommendQuery(user, 10, log.recent_items(user, 200),
                                                             exclude_item_ids=log.hidden_items(user)),
                                              time.monotonic() + 5))
        assert [r["item_id"] for r in exported] == [r.item_id for r in answer.items], user
        assert [r["rank"] for r in exported] == list(range(1, 11))
    assert "i3" not in {r["item_id"] for r in rows if r["user_id"] == "u0"}  # hidden stays hidden
    log.close()


def test_export_refuses_what_it_cannot_read(tiny_bundle: Path, tmp_path: Path) -> None:
    for arguments, needle in [(["--bundle", str(tmp_path)], "no bundle"),
                              (["--bundle", str(tiny_bundle), "--db", str(tmp_path / "none.sqlite")], "no event log")]:
        result = CliRunner().invoke(app, ["export", *arguments, "--out", str(tmp_path / "x.parquet")],
                                    terminal_width=200)
        said = " ".join(result.output.replace("│", " ").split())  # the error box wraps long paths
        assert result.exit_code == 2 and needle in said
