"""Synthetic catalogues with the structure real ones have, for tests and scale runs.

Items belong to latent topics; popularity within a catalogue follows a power law; each
user has a few favourite topics; sequences move mostly within a topic and often to the
"next in series" item, so order matters; every item has text drawn from its topic's
vocabulary, so text carries signal about taste.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recdata.dataset import Dataset

_NOUNS = ("quest", "garden", "engine", "harbor", "signal", "forest", "voyage", "canvas",
          "circuit", "kitchen", "legend", "planet", "river", "market", "studio", "castle")
_ADJECTIVES = ("quiet", "bright", "broken", "golden", "hidden", "rapid", "ancient", "vivid",
               "frozen", "gentle", "wild", "silent", "urban", "lunar", "crimson", "modern")


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 500
    num_items: int = 1000
    num_topics: int = 12
    mean_length: int = 30       # mean interactions per user (geometric, at least min_length)
    min_length: int = 5
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity within a topic
    stay_in_topic: float = 0.8  # chance the next item shares the current item's topic
    next_in_series: float = 0.35  # chance the next item is the current one's sequel
    tastes_per_user: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < self.num_topics:
            raise ValueError(f"num_items={self.num_items} must be >= num_topics={self.num_topics}")
        if not 0 <= self.stay_in_topic <= 1 or not 0 <= self.next_in_series <= 1:
            raise ValueError("stay_in_topic and next_in_series are probabilities in [0, 1]")
        if self.min_length < 1 or self.mean_length < self.min_length:
            raise ValueError("need 1 <= min_length <= mean_length")


def topic_words(topic: int) -> list[str]:
    """The words that describe one topic: a pair of vocabulary words plus a code word."""
    return [_ADJECTIVES[topic % len(_ADJECTIVES)], _NOUNS[(topic * 7) % len(_NOUNS)],
            f"theme{topic}"]


def generate(config: SyntheticConfig) -> Dataset:
    """Make a synthetic data set; the same config gives the same data."""
    rng = np.random.default_rng(config.seed)
    item_topic = rng.integers(0, config.num_topics, config.num_items)
    by_topic = [np.flatnonzero(item_topic == t) for t in range(config.num_topics)]
    # Power-law popularity inside each topic: rank r gets weight 1 / (r + 1)^exponent.
    weights = []
    for members in by_topic:
        w = 1.0 / np.arange(1, len(members) + 1) ** config.popularity_exponent
        weights.append(w / w.sum() if len(w) else w)
    sequel = np.full(config.num_items, -1)
    for members in by_topic:
        sequel[members[:-1]] = members[1:]

    sequences = []
    for _ in range(config.num_users):
        drawn = rng.choice(config.num_topics, size=config.tastes_per_user, replace=False)
        tastes = [int(t) for t in drawn if len(by_topic[t])] or [int(item_topic[0])]
        length = config.min_length + int(rng.geometric(1 / (config.mean_length - config.min_length + 1))) - 1
        topic = int(rng.choice(tastes))
        current = int(rng.choice(by_topic[topic], p=weights[topic]))
        seq, had = [current], {current}
        # Nobody consumes an item twice (as in MovieLens); a draw that repeats is redrawn, and
        # after a few misses the sequence ends early rather than loop.
        misses = 0
        while len(seq) < length and misses < 20:
            if sequel[current] >= 0 and rng.random() < config.next_in_series:
                candidate = int(sequel[current])
            else:
                stay = rng.random() < config.stay_in_topic
                topic = int(item_topic[current]) if stay else int(rng.choice(tastes))
                candidate = int(rng.choice(by_topic[topic], p=weights[topic]))
            if candidate in had:
                misses += 1
                continue
            current, misses = candidate, 0
            seq.append(current)
            had.add(current)
        sequences.append(np.asarray(seq, dtype=np.int64))

    texts: list[str] = []
    tags: list[tuple[str, ...]] = []
    for item in range(config.num_items):
        topic = int(item_topic[item])
        words = topic_words(topic)
        texts.append(f"The {words[0]} {words[1]} #{item}: a {words[2]} story")
        tags.append((f"topic{topic}",))
    return Dataset(
        name=f"synthetic-{config.num_users}x{config.num_items}",
        user_ids=[f"u{u}" for u in range(config.num_users)],
        item_ids=[f"i{i}" for i in range(config.num_items)],
        sequences=sequences,
        item_texts=texts,
        item_tags=tags,
    )


def write_pairs(dataset: Dataset, folder: Path) -> tuple[Path, Path]:
    """Write `interactions.txt` (`user item` per line, time order per user) and `items.csv`."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs, items = folder / "interactions.txt", folder / "items.csv"
    with pairs.open("w", encoding="utf-8") as f:
        for user, seq in zip(dataset.user_ids, dataset.sequences, strict=True):
            f.writelines(f"{user} {dataset.item_ids[i]}\n" for i in seq)
    with items.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item", "text", "tags"])
        for item_id, text, tags in zip(dataset.item_ids, dataset.item_texts, dataset.item_tags, strict=True):
            writer.writerow([item_id, text, "|".join(tags)])
    return pairs, items
