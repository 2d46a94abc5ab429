"""`recfunnel` commands that make and judge models: `train`, `evaluate`, and `synth` for
synthetic data."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from cluster.cli.options import (
    DataFormat,
    DatasetOption,
    FormatOption,
    InteractionsOption,
    ItemColumnOption,
    ItemsOption,
    load_data,
    progress_console,
)

group = typer.Typer()


@contextlib.contextmanager
def phase_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A `ranking.train.PhaseProgress` drawing one rich bar per long phase, with its estimate
    of the time left, on stderr beside the log; a finished phase's bar goes away."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("left"), TimeRemainingColumn(), console=progress_console, transient=True) as bars:
        tasks: dict[str, Any] = {}
        started: dict[str, float] = {}

        def phase(name: str, done: int, total: int) -> None:
            if name not in tasks or (name not in started and done < total):  # starts, or runs again
                for earlier in tasks.values():  # one phase at a time
                    bars.update(earlier, visible=False)
                if name in tasks:
                    bars.reset(tasks[name], total=total, visible=True)
                else:
                    tasks[name] = bars.add_task(name, total=total)
                started[name] = time.monotonic()
                if not progress_console.is_terminal:  # a log file or CI draws no bar: a line instead
                    progress_console.log(f"{name}: {total:,} to do")
            bars.update(tasks[name], completed=done, total=total)
            if done >= total and name in started:
                progress_console.log(f"{name}: {total:,} done in {time.monotonic() - started.pop(name):.1f} s")

        yield phase


@group.command("train")
def train_command(
    out: Annotated[Path, typer.Option(help="folder to write the bundle to")],
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    item_column: ItemColumnOption = None,
    fmt: FormatOption = DataFormat.pairs,
    config_file: Annotated[Path | None, typer.Option("--config", help="training settings (TOML): model size, "
                                                                      "negatives, batch, lr, epochs, budgets; "
                                                                      "unset, the size-following ones come from "
                                                                      "the data (ranking.sizing)")
                           ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="most query-encoder epochs (early stopping ends "
                                                           "sooner) [default: from the data's size, 60 for "
                                                           "ML-100K]")] = None,
    seconds: Annotated[float | None, typer.Option(help="time budget of the query-encoder phase "
                                                         "[default: from the data's size, 600 for ML-100K]")
                       ] = None,
    ranker_seconds: Annotated[float | None, typer.Option(help="time budget of the ranker phase "
                                                                "[default: half the encoder's]")
                              ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed [default: 0]")] = None,
    curve: Annotated[Path | None, typer.Option(help="write NDCG@10 against seconds to this PNG")] = None,
    workers: Annotated[int, typer.Option(min=0, max=256, help="Ray Train data-parallel replicas (0 = in this "
                                                                "process, no Ray)")] = 0,
    storage: Annotated[Path, typer.Option(help="Ray Train checkpoints (with --workers)")] = Path("ray-train"),
    address: Annotated[str | None, typer.Option(help="Ray cluster for --workers (default: a local one)")] = None,
    gpu: Annotated[bool, typer.Option(help="one GPU per Ray Train worker, which trains on it (with --workers)")
                   ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N for training in this process "
                                                    "(default: CUDA when present)")] = None,
) -> None:
    """Train the item/query encoders and the ranker; write a bundle and print its metrics as JSON."""
    from ranking.config import TrainConfig
    from ranking.sizing import DataSize, with_sized_defaults
    from ranking.train import train

    if workers and device is not None:
        raise typer.BadParameter("Ray Train workers train where Ray places them: use --gpu, not --device",
                                 param_hint="--device")
    if device is not None:
        from ranking.devices import resolve_device

        try:
            resolve_device(device)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--device") from error
    # Options given on the command line win over the config file, which wins over the defaults.
    given = {"epochs": epochs, "time_budget_s": seconds, "ranker_time_budget_s": ranker_seconds, "seed": seed,
             "device": device}
    overrides = {k: v for k, v in given.items() if v is not None} | {"track_test": curve is not None}
    try:
        explicit = {**(TrainConfig.read_file(config_file) if config_file else {}), **overrides}
        TrainConfig.from_dict(explicit)  # a bad value is refused before the data is read
    except (ValueError, TypeError, OSError) as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error

    def report(stage: str, values: dict[str, float]) -> None:
        progress_console.log(f"{stage} epoch {values['epoch']:.0f}: loss {values['loss']:.2f}, "
                    f"val NDCG@10 {values['ndcg@10']:.4f}, HR@10 {values['hr@10']:.4f}")

    with phase_bars() as phase:
        data = load_data(dataset, interactions, items, fmt, item_column,
                         progress=lambda done, total: phase("reading", done, total))
        # What the config file and the options leave unset of the size-following settings, the
        # data's size decides (`ranking.sizing`).
        size = DataSize.of(data)
        settings, decided = with_sized_defaults(size, explicit)
        try:
            config = TrainConfig.from_dict(settings)
        except (ValueError, TypeError) as error:
            raise typer.BadParameter(str(error), param_hint="--config") from error
        if decided:
            chosen = {**settings, **{f"model.{k}": v for k, v in settings["model"].items()}}
            progress_console.log("settings from the data's size (" + f"{size.interactions:,} interactions, "
                                 f"{size.items:,} items): " + ", ".join(f"{k} {chosen[k]}" for k in decided))
        if workers:
            import os

            import ray

            from cluster.train_ray import RayTrainConfig, train_on_ray

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            try:
                result = train_on_ray(data, config, out, RayTrainConfig(workers=workers, storage=storage, use_gpu=gpu),
                                      phase_progress=phase)
            finally:
                ray.shutdown()
        else:
            result = train(data, config, out, progress=report, phase_progress=phase)
    if curve is not None:
        from bench.plots import plot_training_curve

        plot_training_curve(result.curve, curve, f"recfunnel training on {data.name}")
    typer.echo(json.dumps({"bundle": str(out), "version": result.version, "config": config.to_dict(),
                           "sized": {"data": size.to_dict(), "decided": decided},
                           "metrics": result.metrics, "curve": result.curve}, indent=2, default=str))


@group.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="bundle folder written by `recfunnel train`")],
    dataset: DatasetOption = "ml-100k",
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    item_column: ItemColumnOption = None,
    fmt: FormatOption = DataFormat.pairs,
    seconds_per_model: Annotated[float, typer.Option(help="training budget of each ablation and cold-start "
                                                     "model")] = 100.0,
    baselines: Annotated[bool, typer.Option(help="train both SASRecs, the ablations and cold-start models")] = True,
    baseline_seconds: Annotated[float | None, typer.Option(help="cap each SASRec baseline's training (default: "
                                                           "none, to convergence; a capped one says so)")] = None,
    cold_draws: Annotated[int, typer.Option(min=1, max=20, help="seeded draws of cold items, cases pooled")] = 1,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N for every model "
                                                    "(default: CUDA where torch sees one)")] = None,
    users: Annotated[int, typer.Option(min=0, help="evaluate a seeded sample of this many users "
                                                  "(0 = every user)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """Full-ranking and sampled metrics of the funnel against baselines trained in the same run."""
    from ranking.quality import EvaluateConfig
    from ranking.quality import evaluate as run_evaluation
    from recdata.ceiling import Generator

    try:
        config = EvaluateConfig(seconds_per_model=seconds_per_model, baselines=baselines, seed=seed,
                                baseline_seconds=baseline_seconds,
                                cold_draws=cold_draws, device=device, users=users)
    except ValueError as error:  # the message names the option's field
        raise typer.BadParameter(str(error)) from error
    try:  # a synthetic set's generator, where `recfunnel synth` left one beside the data
        generator = Generator.beside(interactions) if interactions else None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--interactions") from error
    data = load_data(dataset, interactions, items, fmt, item_column)
    report = run_evaluation(bundle, data, config, report=None if as_json else progress_console.log,
                            generator=generator)
    typer.echo(json.dumps(report, indent=None if as_json else 2))


@group.command()
def synth(
    out: Annotated[Path, typer.Option(help="folder for interactions.parquet (or .txt with --format pairs) "
                                           "and items.csv")],
    users: Annotated[int, typer.Option(min=1, help="users")] = 20_000,
    items: Annotated[int, typer.Option(min=1, help="catalogue items")] = 20_000,
    mean_length: Annotated[int, typer.Option(min=2, help="mean interactions per user")] = 15,
    topics: Annotated[int, typer.Option(min=1, help="latent topics")] = 50,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    fmt: Annotated[DataFormat, typer.Option("--format", help="parquet (user,item,timestamp; vectorised, for "
                                                             "millions of events) or pairs")] = DataFormat.parquet,
    image_dim: Annotated[int, typer.Option(min=0, max=4096, help="> 0: give every item an image-like vector "
                                           "of this size (column vector:image) that carries part of its topic")] = 0,
    image_signal: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of an image vector's variance "
                                                "that is its topic")] = 0.5,
    content_signal: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of items whose text and tag "
                                                  "name their topic; the rest get bland titles")] = 1.0,
) -> None:
    """Write a synthetic data set (interactions plus an item file with text, and image-like
    vectors with --image-dim), for scale and quality runs."""
    from rich.progress import Progress

    from recdata.ceiling import Generator
    from recdata.synthetic import SyntheticConfig, generate, write_pairs, write_parquet

    if fmt == DataFormat.csv:
        raise typer.BadParameter("synth writes parquet or pairs", param_hint="--format")
    config = SyntheticConfig(num_users=users, num_items=items, num_topics=min(topics, items),
                             mean_length=mean_length, min_length=min(5, mean_length), seed=seed,
                             image_dim=image_dim, image_signal=image_signal, content_signal=content_signal)
    if fmt == DataFormat.pairs:
        data = generate(config)
        interactions, item_file = write_pairs(data, out)
        count = data.num_interactions
    else:
        with Progress(console=progress_console, transient=True) as progress:
            task = progress.add_task("writing synthetic interactions", total=users)
            interactions, item_file, count = write_parquet(
                config, out, lambda done, _total: progress.update(task, completed=done))
    # What drew the set, so that `bench ceiling` and `evaluate` can work out its best possible ranking.
    generator = Generator(config, "redraw" if fmt == DataFormat.pairs else "skip").write(out)
    typer.echo(json.dumps({"interactions": str(interactions), "items": str(item_file), "format": fmt.value,
                           "generator": str(generator),
                           "users": users, "catalogue": items, "pairs": count,
                           "item_vectors": {"image": image_dim} if image_dim else {}}))


@group.command("export")
def export_command(
    bundle: Annotated[Path, typer.Option(help="bundle folder written by `recfunnel train`")],
    out: Annotated[Path, typer.Option(help="Parquet file of user_id, rank, item_id, score rows")],
    users: Annotated[str, typer.Option(help="a file of user ids, one a line, or 'all' (every user in the log)")
                     ] = "all",
    db: Annotated[str, typer.Option(help="event store the histories are read from: a SQLite file or a "
                                         "postgresql:// URL")] = "recfunnel.sqlite",
    k: Annotated[int, typer.Option(min=1, max=1000, help="items per user")] = 100,
    actors: Annotated[int, typer.Option(min=1, max=1024, help="Ray Data actors scoring in parallel")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, max=65_536, help="users scored together")] = 256,
    address: Annotated[str | None, typer.Option(help="Ray cluster (default: a local one)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: CUDA where torch sees one)")
                      ] = None,
    cluster_config: Annotated[Path | None, typer.Option("--config", help="the cluster config whose [feedback] "
                                                        "event types the gateways read history by")] = None,
) -> None:
    """Every listed user's top-k from their logged history, as Recommend answers, scored with Ray Data."""
    import os

    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster.export import ExportConfig, all_users, export, user_lines
    from gateway.events import is_postgres_url
    from recdata.feedback import EVERY_TYPE_POSITIVE, EventTypes

    if not (bundle / "manifest.json").is_file():
        raise typer.BadParameter(f"{bundle} holds no bundle (no manifest.json)", param_hint="--bundle")
    if not is_postgres_url(db) and not Path(db).is_file():
        raise typer.BadParameter(f"no event log at {db}", param_hint="--db")
    if users != "all" and not Path(users).is_file():
        raise typer.BadParameter(f"{users} is neither 'all' nor a file of user ids", param_hint="--users")
    wanted = all_users(db) if users == "all" else list(dict.fromkeys(user_lines(Path(users))))
    feedback = EVERY_TYPE_POSITIVE
    if cluster_config is not None:
        import tomllib

        try:
            feedback = EventTypes.from_dict(tomllib.loads(cluster_config.read_text("utf-8")).get("feedback", {}))
        except (OSError, ValueError) as error:
            raise typer.BadParameter(str(error), param_hint="--config") from error
    config = ExportConfig(bundle=bundle, store=db, out=out, k=k, batch_size=batch_size, actors=actors, device=device,
                          feedback=feedback)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, log_to_driver=False, configure_logging=False, include_dashboard=False)
    try:
        with Progress(TextColumn("[bold]scoring users"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=progress_console) as bar:
            task = bar.add_task("export", total=len(wanted))
            report = export(config, wanted, lambda done, total: bar.update(task, completed=done))
    finally:
        ray.shutdown()
    typer.echo(json.dumps(report, indent=2))
