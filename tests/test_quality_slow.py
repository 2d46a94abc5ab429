"""MovieLens-100K quality, end to end (minutes, so `make test-slow`, not CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ranking.config import TrainConfig
from ranking.quality import EvaluateConfig, evaluate
from ranking.train import train
from recdata.movielens import load_ml100k

RECBOLE_SASREC = {"ndcg@10": 0.0670, "hr@10": 0.1442}  # PEERS.md, same split and protocol


@pytest.mark.slow
def test_ml100k_funnel_beats_the_peer_and_the_baselines(tmp_path: Path) -> None:
    dataset = load_ml100k()
    result = train(dataset, TrainConfig(time_budget_s=150, ranker_time_budget_s=100, ranker_epochs=3),
                   tmp_path / "bundle")
    report = evaluate(result.folder, dataset, EvaluateConfig(seconds_per_model=100))
    funnel = report["funnel"]["full"]
    assert funnel["ndcg@10"] >= 1.25 * RECBOLE_SASREC["ndcg@10"]
    assert funnel["hr@10"] >= 1.2 * RECBOLE_SASREC["hr@10"]
    assert funnel["ndcg@10"] > report["recall"]["full"]["ndcg@10"]
    sasrec = report["baselines"]["sasrec_bce"]
    assert funnel["ndcg@10"] > sasrec["full"]["ndcg@10"]
    assert report["funnel"]["sampled100"]["ndcg@10"] > sasrec["sampled100"]["ndcg@10"]
    cold = report["cold_start"]["hr@10"]
    assert cold["text"] >= 5 * cold["random"] and cold["text"] >= 3 * cold["no_text"]
    assert funnel["ndcg@10"] >= report["ablation"]["no_text"]["full"]["ndcg@10"]
