"""The `recfunnel` command line: help, and `train` on a pairs file end to end."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cluster.cli import app
from recdata.bundle import load_bundle
from recdata.synthetic import SyntheticConfig, generate

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "train" in result.output


def test_train_on_a_pairs_file_writes_a_bundle(tmp_path: Path) -> None:
    data = generate(SyntheticConfig(num_users=80, num_items=60, num_topics=4, mean_length=12, seed=2))
    pairs = tmp_path / "events.txt"
    pairs.write_text("".join(f"{data.user_ids[u]} {data.item_ids[i]}\n"
                             for u, seq in enumerate(data.sequences) for i in seq))
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["train", "--interactions", str(pairs), "--format", "pairs", "--out", str(out),
                                 "--epochs", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the JSON alone: progress and log lines go to stderr
    assert report["version"] == load_bundle(out).version
    assert "encoder epoch 1" in result.stderr
    assert 0 <= report["metrics"]["test"]["funnel"]["hr@10"] <= 1


def test_unknown_dataset_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--dataset", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown dataset" in result.output


def test_phase_lines_name_every_run_of_a_phase(monkeypatch) -> None:
    """Without a terminal each phase logs a start and an end line: a phase that runs again
    (a validation) logs both again, and a phase done in its first report logs both at once."""
    from rich.console import Console

    from cluster.cli import training

    console = Console(record=True, force_terminal=False, width=200)
    monkeypatch.setattr(training, "progress_console", console)
    with training.phase_bars() as phase:
        for done in (0, 1, 2):
            phase("validation", done, 2)
        for done in (0, 2):
            phase("validation", done, 2)
        phase("encoder epoch 1", 1, 1)
    text = console.export_text()
    assert text.count("validation: 2 to do") == 2 and text.count("validation: 2 done in") == 2
    assert "encoder epoch 1: 1 to do" in text and "encoder epoch 1: 1 done in" in text
