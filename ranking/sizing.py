"""The data-size rule: the training settings that follow a data set's size.

`recfunnel train` takes these from the data unless the config file or the command line sets
them; everything else keeps `TrainConfig`'s defaults. The rule is chosen so that
MovieLens-100K (943 users, 1,682 items, 10^5 interactions, median history 65, 90th
percentile 244) gets exactly the defaults every figure in BENCHMARKS.md was measured with.

  epochs                most encoder epochs: 10^7 / interactions, within 100..200 (small data
                        needs more passes; on larger data the time budget binds first, and early
                        stopping usually ends either sooner: the 10^5 set's encoder, at 6 x 10^6 /
                        interactions, was cut after 61 epochs while improving with a third of
                        its time budget left)
  time_budget_s         600 s x sqrt(interactions / 10^5), within 600..3600 (an epoch's cost
                        grows with the interactions, convergence in epochs shrinks)
  ranker_time_budget_s  half the encoder's (as set, or as the rule has it)
  ranker_epochs         enough for five passes over the ranker's examples (each user's most
                        recent `ranker_positions`), within 6..60: on the 10^5 set the ranker
                        peaks after 2.5 passes and its patience ends it after 5, while 6 epochs
                        of 40,000 examples are 0.6 of a pass over the 10^6 set's 400,000. The
                        time budget binds first on large data
  num_negatives         items / 64, within 1024..8192 (a larger catalogue needs more negatives
                        per step to tell its items apart; the step's cost follows this, not the
                        catalogue)
  model.dim             64 below 10^5 items, 128 from there (more items to separate)
  model.max_len         the 90th percentile history, rounded up to tens, within 10..50; 200
                        where the median history reaches 150 (SASRec's recipe for long
                        histories, as MovieLens-1M's)
  model.encoder         "sasrec" below 3 x 10^5 interactions, "hstu" from there. Where the
                        SASRec-style encoder converges inside its budget (ML-100K, 10^5) it
                        ranks best; where the budget cuts it while it still learns (10^6), the
                        HSTU-style encoder's cheaper epochs and faster learning win. The
                        boundary is the geometric middle of the two sizes measured
                        (BENCHMARKS.md)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ranking.config import TrainConfig
from recdata.dataset import Dataset

# The settings the rule decides, as a config file names them.
SIZED_SETTINGS = ("epochs", "time_budget_s", "ranker_time_budget_s", "ranker_epochs", "num_negatives",
                  "model.dim", "model.max_len", "model.encoder")
# From this many interactions the rule picks the HSTU-style encoder (see `model.encoder` above).
HSTU_FROM_INTERACTIONS = 300_000
# Passes over its examples the rule gives the ranker phase (see `ranker_epochs` above).
RANKER_PASSES = 5


@dataclass(frozen=True)
class DataSize:
    users: int
    items: int
    interactions: int
    median_length: float   # of the users' histories
    p90_length: float

    @classmethod
    def of(cls, dataset: Dataset) -> DataSize:
        lengths = np.array([len(s) for s in dataset.sequences] or [0])
        return cls(users=dataset.num_users, items=dataset.num_items, interactions=int(lengths.sum()),
                   median_length=float(np.median(lengths)), p90_length=float(np.percentile(lengths, 90)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sized_settings(size: DataSize, ranker_positions: int = TrainConfig.ranker_positions,
                   ranker_examples_per_epoch: int = TrainConfig.ranker_examples_per_epoch) -> dict[str, Any]:
    """The rule's settings for data of this size, shaped as a config file's values; the ranker's
    epochs count its examples as the config has them."""
    interactions = max(1, size.interactions)
    ranker_examples = size.users * ranker_positions
    encoder_seconds = float(min(3600, 600 * math.sqrt(max(1.0, interactions / 1e5))))
    long_histories = size.median_length >= 150
    max_len = 200 if long_histories else int(min(50, max(10, math.ceil(size.p90_length / 10) * 10)))
    return {
        "epochs": int(min(200, max(100, round(1e7 / interactions)))),
        "time_budget_s": round(encoder_seconds, 1),
        "ranker_time_budget_s": round(encoder_seconds / 2, 1),
        "ranker_epochs": int(min(60, max(6, math.ceil(RANKER_PASSES * ranker_examples / ranker_examples_per_epoch)))),
        "num_negatives": int(min(8192, max(1024, size.items // 64))),
        "model": {"dim": 64 if size.items < 100_000 else 128, "max_len": max_len,
                  "encoder": "sasrec" if interactions < HSTU_FROM_INTERACTIONS else "hstu"},
    }


def with_sized_defaults(size: DataSize, explicit: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`explicit` settings (a config file's, the command line's) over the rule's: the merged
    values and the names of the settings the rule decided."""
    rule = sized_settings(size, **{k: explicit[k] for k in ("ranker_positions", "ranker_examples_per_epoch")
                                   if k in explicit})
    model_rule = rule.pop("model")
    if "time_budget_s" in explicit:  # the ranker's budget stays half the encoder's
        rule["ranker_time_budget_s"] = explicit["time_budget_s"] / 2
    given_model = dict(explicit.get("model", {}))
    merged = {**rule, **explicit, "model": {**model_rule, **given_model}}
    decided = [k for k in rule if k not in explicit] + [f"model.{k}" for k in model_rule if k not in given_model]
    return merged, decided
