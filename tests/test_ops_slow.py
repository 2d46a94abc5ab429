"""`recfunnel up` / `status` / `down` as an operator runs them: a real local Ray head started
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


def recfunnel(*args: str, home: Path) -> str:
    env = {**os.environ, "RECFUNNEL_CACHE": str(home)}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_up_status_down_run_a_detached_cluster(tiny_bundle: Path, tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(f'bundle = "{tiny_bundle}"\ndb_path = "{tmp_path / "events.sqlite"}"\nnum_shards = 2\n'
                      'gateway_port = 50093\n[ranker_resources]\nnum_cpus = 0.5\n', "utf-8")
    recfunnel("up", "--config", str(config), home=tmp_path)
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
    finally:
        recfunnel("down", home=tmp_path)
    assert not (tmp_path / "up.json").exists()
