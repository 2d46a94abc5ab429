"""The best any model can do on a synthetic set: the generator's own next-item odds.

A synthetic set is drawn from a process we know (`recdata.synthetic`), so the chance that
each item is a user's next one, given the history, can be worked out rather than learned.
Ranking by that chance maximises expected NDCG@k, so its NDCG on the held-out targets is
the ceiling of the set: no model passes it by more than the test's noise, and the room
between a baseline and the ceiling is all any model can win over that baseline.

The odds are exact for the process, up to two things we leave out: a sequence ends where
its drawn length says, which does not depend on its items, and the vectorised walk gives up
after a fixed number of steps, which shortens a few long sequences.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from recdata.synthetic import SyntheticConfig, catalogue_of

# How a walk treats a draw of an item the user already took. `skip`: the vectorised writer
# (`write_parquet`) moves on to it and leaves it out of the log, so the next logged item may
# lie several hidden steps on. `redraw`: `generate` (the pairs writer) draws again from the
# same item until it finds a new one.
Walk = Literal["skip", "redraw"]
WALKS: tuple[Walk, ...] = ("skip", "redraw")

GENERATOR_FILE = "synthetic.json"  # written beside a synthetic set's interactions
_HIDDEN_STEPS = 200                 # a skip walk's mass left on taken items falls geometrically
_ITEM_ID = re.compile(r"i(\d+)")


@dataclass(frozen=True)
class Generator:
    """What drew a synthetic set: its config and its walk."""

    config: SyntheticConfig
    walk: Walk

    def __post_init__(self) -> None:
        if self.walk not in WALKS:
            raise ValueError(f"walk={self.walk!r} must be one of {', '.join(WALKS)}")

    def write(self, folder: Path) -> Path:
        path = folder / GENERATOR_FILE
        path.write_text(json.dumps({"walk": self.walk, "config": asdict(self.config)}, indent=2) + "\n")
        return path

    @classmethod
    def beside(cls, interactions: Path) -> Generator | None:
        """The generator of the set whose interactions file this is; None if it has no
        `synthetic.json` beside it (it is not a synthetic set, or an older one)."""
        path = interactions.parent / GENERATOR_FILE
        if not path.exists():
            return None
        try:
            written = json.loads(path.read_text())
            return cls(SyntheticConfig(**written["config"]), written["walk"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} does not describe a synthetic set's generator: {error}") from error


class NextItemOdds:
    """P(next logged item | history) under a generator, for every item of its catalogue.

    Per history the work grows with the history's length and the catalogue (one dense row
    of odds), not with the number of users or events.
    """

    def __init__(self, generator: Generator):
        config = generator.config
        self.walk = generator.walk
        catalogue = catalogue_of(config, np.random.default_rng(config.seed))
        self.item_topic = catalogue.item_topic
        self.sequel = catalogue.sequel
        self.within = catalogue.share   # the chance an item is drawn when its topic is
        counts = np.bincount(self.item_topic, minlength=config.num_topics)
        self.follow = np.where(self.sequel >= 0, config.next_in_series, 0.0)
        self.stay = config.stay_in_topic
        self.topics = np.flatnonzero(counts)             # the topics a taste can be
        self.tastes = min(config.tastes_per_user, len(self.topics))
        self.num_items, self.num_topics = config.num_items, config.num_topics

    def taste_weights(self, seen_topics: np.ndarray) -> np.ndarray:
        """(T,) the chance that a jump out of the current topic lands in each topic.

        A user's walk only ever visits their tastes, so every topic in the history is one; a
        jump picks one of the `tastes` uniformly, and tastes not yet seen are equally likely
        to be any topic not yet seen.
        """
        weights = np.zeros(self.num_topics)
        seen = np.unique(seen_topics)
        if len(seen) >= self.tastes:
            weights[seen] = 1.0 / len(seen)
            return weights
        unseen = np.setdiff1d(self.topics, seen)
        weights[unseen] = (self.tastes - len(seen)) / len(unseen) / self.tastes
        weights[seen] = 1.0 / self.tastes
        return weights

    def next_item(self, history: np.ndarray) -> np.ndarray:
        """(num_items,) the chance of each item being logged next after `history` (generator
        item numbers, oldest first); 0 on the history's items, summing to 1."""
        seen = np.unique(history)
        seen_topic = self.item_topic[seen]
        jump = self.taste_weights(seen_topic)
        # The walk's hidden position, spread over taken items: it starts on the last logged item.
        at = np.zeros(len(seen))
        at[np.searchsorted(seen, history[-1])] = 1.0
        topic_mass = np.zeros(self.num_topics)   # mass that draws by popularity within each topic
        sequel_mass = np.zeros(self.num_items)   # mass that steps to each item as a sequel
        for _ in range(_HIDDEN_STEPS):
            follows = at * self.follow[seen]
            has_sequel = follows > 0
            np.add.at(sequel_mass, self.sequel[seen[has_sequel]], follows[has_sequel])
            rest = at - follows
            drawn = np.bincount(seen_topic, weights=rest * self.stay, minlength=self.num_topics)
            drawn += rest.sum() * (1 - self.stay) * jump
            topic_mass += drawn
            if self.walk == "redraw":  # a taken item is drawn again from here: renormalised below
                break
            # Mass that landed on a taken item walks on from there, unlogged.
            at = drawn[seen_topic] * self.within[seen] + sequel_mass[seen]
            sequel_mass[seen] = 0.0
            if at.sum() < 1e-12:
                break
        odds = topic_mass[self.item_topic] * self.within + sequel_mass
        odds[seen] = 0.0
        return odds / odds.sum()

    def catalogue_positions(self, item_ids: list[str]) -> np.ndarray:
        """Each of a data set's item ids as its generator item number (ids read `i<n>`)."""
        numbers = np.empty(len(item_ids), dtype=np.int64)
        for n, item_id in enumerate(item_ids):
            match = _ITEM_ID.fullmatch(item_id)
            if match is None or int(match.group(1)) >= self.num_items:
                raise ValueError(f"item {item_id!r} is not one of this generator's items i0..i{self.num_items - 1}")
            numbers[n] = int(match.group(1))
        return numbers
