"""The `recfunnel` command line."""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="recfunnel: a gRPC recommendation cluster (FAISS recall, transformer ranking, Ray).",
                  no_args_is_help=True, add_completion=False)
console = Console()


class DataFormat(str, Enum):
    pairs = "pairs"
    csv = "csv"
    parquet = "parquet"


def load_data(dataset: str | None, interactions: Path | None, items: Path | None, fmt: DataFormat):
    """The named data set, or interactions read from a file."""
    from recdata.dataset import read_interactions
    from recdata.movielens import load_ml100k

    if interactions is not None:
        return read_interactions(interactions, fmt.value, items)
    if dataset == "ml-100k":
        return load_ml100k()
    raise typer.BadParameter(f"unknown dataset {dataset!r}; use ml-100k or --interactions FILE", param_hint="--dataset")


@app.command()
def demo(
    serve: Annotated[bool, typer.Option("--serve", help="keep serving on 127.0.0.1:50051 until interrupted")] = False,
    port: Annotated[int, typer.Option(help="gateway port")] = 50051,
    bundle: Annotated[Path | None, typer.Option(help="serve this trained bundle instead of training one")] = None,
    train_seconds: Annotated[float, typer.Option(help="time budget of the query-encoder training")] = 150.0,
    shards: Annotated[int, typer.Option(min=1, max=16, help="recall shards")] = 2,
) -> None:
    """Train on MovieLens-100K, start the cluster on local Ray, and show answers over gRPC."""
    from cluster.demo import DemoOptions, run_demo

    logging.basicConfig(level=logging.WARNING)
    run_demo(DemoOptions(serve=serve, port=port, bundle=bundle, train_seconds=train_seconds, num_shards=shards),
             console)


@app.command("train")
def train_command(
    out: Annotated[Path, typer.Option(help="folder to write the bundle to")],
    dataset: Annotated[str, typer.Option(help="named data set")] = "ml-100k",
    interactions: Annotated[Path | None, typer.Option(help="interactions file instead of a named data set")] = None,
    items: Annotated[Path | None, typer.Option(help="item file: CSV item,text[,tags]")] = None,
    fmt: Annotated[DataFormat, typer.Option("--format", help="format of --interactions")] = DataFormat.pairs,
    epochs: Annotated[int, typer.Option(min=1, help="most query-encoder epochs (early stopping ends sooner)")] = 60,
    seconds: Annotated[float, typer.Option(help="time budget of the query-encoder phase")] = 600.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    curve: Annotated[Path | None, typer.Option(help="write NDCG@10 against seconds to this PNG")] = None,
) -> None:
    """Train the item/query encoders and the ranker; write a bundle and print its metrics as JSON."""
    from ranking.config import TrainConfig
    from ranking.train import train

    data = load_data(dataset, interactions, items, fmt)
    config = TrainConfig(epochs=epochs, time_budget_s=seconds, seed=seed)

    def report(stage: str, values: dict[str, float]) -> None:
        console.log(f"{stage} epoch {values['epoch']:.0f}: loss {values['loss']:.2f}, "
                    f"val NDCG@10 {values['ndcg@10']:.4f}, HR@10 {values['hr@10']:.4f}")

    result = train(data, config, out, progress=report)
    if curve is not None:
        from cluster.plots import plot_training_curve

        plot_training_curve(result.curve, curve, f"recfunnel training on {data.name}")
    typer.echo(json.dumps({"bundle": str(out), "version": result.version, "metrics": result.metrics,
                           "curve": result.curve}, indent=2))


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="bundle folder written by `recfunnel train`")],
    dataset: Annotated[str, typer.Option(help="named data set")] = "ml-100k",
    interactions: Annotated[Path | None, typer.Option(help="interactions file instead of a named data set")] = None,
    items: Annotated[Path | None, typer.Option(help="item file: CSV item,text[,tags]")] = None,
    fmt: Annotated[DataFormat, typer.Option("--format", help="format of --interactions")] = DataFormat.pairs,
    seconds_per_model: Annotated[float, typer.Option(help="training budget of each baseline/ablation")] = 100.0,
    baselines: Annotated[bool, typer.Option(help="train SASRec-BCE, the no-text and cold-start models")] = True,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """Full-ranking and sampled metrics of the funnel against baselines trained in the same run."""
    from ranking.quality import EvaluateConfig
    from ranking.quality import evaluate as run_evaluation

    data = load_data(dataset, interactions, items, fmt)
    config = EvaluateConfig(seconds_per_model=seconds_per_model, baselines=baselines, seed=seed)
    report = run_evaluation(bundle, data, config, report=None if as_json else console.log)
    typer.echo(json.dumps(report, indent=None if as_json else 2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
