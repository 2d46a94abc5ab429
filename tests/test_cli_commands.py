"""What the command line shows a person: `status` at 80 columns, and a refused item file."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from cluster.cli import app
from cluster.cli.operations import status_lines

VERSION = "ml-100k-20261201213000-a1b2c3"


def cluster_report(shards: int = 3) -> dict:  # type: ignore[type-arg]
    names = ([f"recfunnel-recall-{n}" for n in range(shards)] + ["recfunnel-ranking-0", "recfunnel-gateway-0",
                                                                   "recfunnel-gateway-1"])
    services = [{"name": name, "role": name.split("-")[1], "state": "ALIVE", "address": f"127.0.0.1:{50061 + n}",
                 "model_version": VERSION, "restarts": n % 2, "rss_bytes": (300 + 10 * n) * 2**20,
                 "node_id": "5d12e8b0fb0b7b193076fe3c31fc24bdd0b1832d8e7bc7701553963d", "pid": 1000 + n}
                for n, name in enumerate(names)]
    for service in services:
        if service["role"] == "gateway":  # the widest figures a busy gateway shows
            service["admission"] = {"enabled": True, "limit": 512, "in_flight": 512, "queued": 32, "admitted": 10**9,
                                    "shed": 123_456_789, "queue_wait_s": 1.5 * 10**6}
    return {"gateway": "127.0.0.1:50051", "gateways": ["127.0.0.1:50051"], "model_version": VERSION,
            "services": services, "loop": {"running": True, "pending": 12, "rounds": 1,
                                           "last_round": {"decision": "rolled out", "version": VERSION}}}


def test_status_shows_every_name_address_and_version_whole_in_80_columns() -> None:
    report = cluster_report()
    console = Console(width=80, record=True, color_system=None)
    for line in status_lines(report):
        console.print(line, highlight=False, markup=False)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for service in report["services"]:
        assert service["name"] in text and service["address"] in text
    assert text.count(VERSION) == len(report["services"]) + 2  # each actor's, the header's, the loop's
    assert "…" not in text
    assert "1 restarts" in text and "300 MB" in text and "12 events pending" in text
    assert text.count("admission limit 512: 512 running, 32 queued; 11.0% shed, queue wait 1.50 ms") == 2


def test_status_lines_fit_80_columns_without_rich_wrapping_them() -> None:
    assert max(len(line) for line in status_lines(cluster_report(shards=12))) <= 80


def test_train_refuses_an_item_file_without_its_columns_and_says_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "pairs.txt").write_text("u1 7\nu1 8\n")
    (tmp_path / "items.csv").write_text("movieId,title\n7,Toy Story\n")
    result = CliRunner().invoke(app, ["train", "--interactions", str(tmp_path / "pairs.txt"), "--items",
                                      str(tmp_path / "items.csv"), "--out", str(tmp_path / "out")],
                                terminal_width=200)
    assert result.exit_code == 2
    assert "found: movieId, title" in " ".join(result.output.split())


def test_train_takes_its_settings_from_a_config_file_and_records_them(tmp_path: Path) -> None:
    import json

    from recdata.bundle import load_bundle
    from recdata.synthetic import SyntheticConfig, generate

    data = generate(SyntheticConfig(num_users=60, num_items=40, num_topics=3, mean_length=8, seed=2))
    pairs = tmp_path / "events.txt"
    pairs.write_text("".join(f"{data.user_ids[u]} {data.item_ids[i]}\n"
                             for u, seq in enumerate(data.sequences) for i in seq))
    settings = tmp_path / "train.toml"
    settings.write_text("epochs = 5\nranker_epochs = 1\nnum_negatives = 16\n[model]\ndim = 24\nheads = 3\n")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["train", "--interactions", str(pairs), "--out", str(out), "--config",
                                      str(settings), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{\n"):])
    assert report["config"]["epochs"] == 2 and report["config"]["model"]["dim"] == 24  # the flag wins
    assert report["metrics"]["stops"]["encoder"]["epochs"] <= 2
    # What neither sets follows the data's size: its short histories get a short encoder window.
    assert "model.max_len" in report["sized"]["decided"] and "epochs" not in report["sized"]["decided"]
    assert report["config"]["model"]["max_len"] < 50 and report["sized"]["data"]["interactions"] == len(
        pairs.read_text().splitlines())
    manifest = load_bundle(out).manifest
    assert manifest["model"]["dim"] == 24 and manifest["training"]["num_negatives"] == 16
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nwidth = 3\n")
    refused = CliRunner().invoke(app, ["train", "--interactions", str(pairs), "--out", str(out), "--config", str(bad)])
    assert refused.exit_code == 2 and "model.width" in refused.output


def test_bench_ablations_compares_the_encoders_on_validation_and_reports_baseline_stops(tmp_path: Path) -> None:
    import json

    from recdata.synthetic import SyntheticConfig, generate, write_pairs

    pairs, items = write_pairs(generate(SyntheticConfig(num_users=120, num_items=80, num_topics=4, seed=2)), tmp_path)
    result = CliRunner().invoke(app, ["bench", "ablations", "--interactions", str(pairs), "--items", str(items),
                                      "--seconds", "3", "--only", "hstu,sasrec_ce", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert {"hstu/recall", "hstu/funnel", "sasrec_ce/recall"} <= set(report["test"])
    assert {"valid_recall_ndcg@10", "train_seconds"} <= set(report["training"]["hstu"])
    assert report["training"]["hstu"]["encoder"] == "hstu"
    assert report["training"]["sasrec_ce"]["reason"] in {"patience", "epochs"}
    assert not report["training"]["sasrec_ce"]["capped"]
    # The variants train with the data-size rule's settings, as `recfunnel train` would, under --seconds.
    settings = report["sized"]["settings"]
    assert settings["time_budget_s"] == 3 and settings["ranker_time_budget_s"] == 1.5
    assert {"epochs", "num_negatives", "model.max_len"} <= set(report["sized"]["decided"])
