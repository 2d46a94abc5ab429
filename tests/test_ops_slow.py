"""`recfunnel up` / `status` / `loop` / `versions` / `down` as an operator runs them: a real local Ray head started
by `up`, the services detached from the command, then stopped (a minute or more: slow)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.client import RecommenderClient
from recdata.dataset import Dataset
from recdata.synthetic import write_pairs


def recfunnel(*args: str, home: Path) -> str:
    env = {**os.environ, "RECFUNNEL_CACHE": str(home)}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_up_status_loop_down_run_a_detached_cluster(tiny_bundle: Path, tiny_dataset: Dataset, tmp_path: Path
                                                    ) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(f'bundle = "{tiny_bundle}"\ndb_path = "{tmp_path / "events.sqlite"}"\nnum_shards = 2\n'
                      'gateway_port = 50093\n[ranker_resources]\nnum_cpus = 0.5\n', "utf-8")
    recfunnel("up", "--config", str(config), "--no-auth", home=tmp_path)
    try:
        status = json.loads(recfunnel("status", "--json", home=tmp_path))
        assert status["gateway"] == "127.0.0.1:50093" and len(status["recall"]) == 2
        assert {s["state"] for s in status["services"]} == {"ALIVE"}
        assert {s["model_version"] for s in status["services"]} == {status["model_version"]}

        async def ask() -> int:
            client = RecommenderClient(status["gateway"], timeout=10)
            try:
                return len((await client.recommend("someone", k=4)).items)
            finally:
                await client.close()

        assert asyncio.run(ask()) == 4  # the services outlived the `up` command

        # `recfunnel loop --once`: a round from the command line over the feedback logged so far.
        async def feed() -> None:
            client = RecommenderClient(status["gateway"], timeout=10)
            try:
                await client.feedback([(f"fan-{n}", tiny_dataset.item_ids[(n + step) % 20], "click", 1.0)
                                       for n in range(12) for step in range(4)])
            finally:
                await client.close()

        asyncio.run(feed())
        pairs, items = write_pairs(tiny_dataset, tmp_path / "data")
        report = json.loads(recfunnel("loop", "--once", "--interactions", str(pairs), "--items", str(items),
                                      "--epochs", "1", "--ranker-epochs", "1", "--output", str(tmp_path / "rounds"),
                                      "--storage", str(tmp_path / "ray-train"),
                                      home=tmp_path))
        assert report["round"] == 1 and report["feedback"]["used"] == 48 and report["feedback"]["new_users"] == 12
        assert report["verdict"]["cases"] == 12 and report["decision"] in {"rolled out", "kept serving version"}
        listed = json.loads(recfunnel("versions", "--json", home=tmp_path))
        serving = [v["version"] for v in listed if v["serving"]]
        assert serving == [report["version"] if report["decision"] == "rolled out" else status["model_version"]]
    finally:
        recfunnel("down", home=tmp_path)
    assert not (tmp_path / "up.json").exists()
