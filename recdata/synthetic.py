"""Synthetic catalogues with the structure real ones have, for tests and scale runs.

Items belong to latent topics; popularity within a catalogue follows a power law; each
user has a few favourite topics; sequences move mostly within a topic and often to the
"next in series" item, so order matters; items have text drawn from their topic's
vocabulary, so text carries signal about taste (all of them by default, a chosen share
otherwise), and optionally an image-like vector that carries part of the topic too.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recdata.dataset import Dataset
from recdata.vectors import COLUMN_PREFIX, MAX_VECTOR_DIM, format_vector

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
    # Share of items whose text and tag name their topic; the rest read "item #i" and carry
    # no tag, as catalogues of pictures with bland titles go.
    content_signal: float = 1.0
    image_dim: int = 0          # > 0: every item gets an "image" vector of this size
    image_signal: float = 0.5   # share of an image vector's variance that is its topic's direction
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < self.num_topics:
            raise ValueError(f"num_items={self.num_items} must be >= num_topics={self.num_topics}")
        if not 0 <= self.stay_in_topic <= 1 or not 0 <= self.next_in_series <= 1:
            raise ValueError("stay_in_topic and next_in_series are probabilities in [0, 1]")
        if self.min_length < 1 or self.mean_length < self.min_length:
            raise ValueError("need 1 <= min_length <= mean_length")
        if not 0 <= self.content_signal <= 1 or not 0 <= self.image_signal <= 1:
            raise ValueError("content_signal and image_signal are shares in [0, 1]")
        if not 0 <= self.image_dim <= MAX_VECTOR_DIM:
            raise ValueError(f"image_dim={self.image_dim} must be in 0..{MAX_VECTOR_DIM} (0 = no image vectors)")


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
    first_tastes = []
    for _ in range(config.num_users):
        drawn = rng.choice(config.num_topics, size=config.tastes_per_user, replace=False)
        tastes = [int(t) for t in drawn if len(by_topic[t])] or [int(item_topic[0])]
        first_tastes.append(tastes[0])
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

    texts, tags = item_texts(config, item_topic)
    return Dataset(
        name=f"synthetic-{config.num_users}x{config.num_items}",
        user_ids=[f"u{u}" for u in range(config.num_users)],
        item_ids=[f"i{i}" for i in range(config.num_items)],
        sequences=sequences,
        item_texts=texts,
        item_tags=[(t,) if t else () for t in tags],
        item_properties=item_properties(config.num_items, config.seed),
        user_properties=user_properties(first_tastes, config.num_topics, config.seed),
        item_vectors=image_vectors(config, item_topic),
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
        names = sorted({name for properties in dataset.item_properties for name in properties})
        vectors = sorted(dataset.item_vectors)
        writer.writerow(["item", "text", "tags", *names, *(COLUMN_PREFIX + v for v in vectors)])
        for n, (item_id, text, tags, properties) in enumerate(zip(dataset.item_ids, dataset.item_texts,
                                                                  dataset.item_tags, dataset.item_properties,
                                                                  strict=True)):
            writer.writerow([item_id, text, "|".join(tags), *(properties.get(name, "") for name in names),
                             *(format_vector(dataset.item_vectors[v][n]) for v in vectors)])
    return pairs, items


# ---- at scale --------------------------------------------------------------------------------
# `generate` walks each user's sequence in Python: exact to the model above, and the data the
# tests are tuned on, but about a second per 10^5 interactions. The same model vectorised over
# users, one step of every sequence at a time, writes 10^7 interactions in a minute or two. It
# drops a repeated item instead of redrawing it, so sequences come out slightly shorter.

USERS_PER_CHUNK = 100_000


@dataclass(frozen=True)
class Catalogue:
    item_topic: np.ndarray    # (I,) topic of each item
    sequel: np.ndarray        # (I,) the next item in its series, -1 for a series' last
    members: np.ndarray       # items grouped by topic, most popular first within each
    cdf: np.ndarray           # (I,) topic + cumulative popularity within the topic, for one searchsorted
    topic_start: np.ndarray   # (T,) offset of each topic's members
    share: np.ndarray         # (I,) the chance of each item when its topic is drawn


def catalogue_of(config: SyntheticConfig, rng: np.random.Generator) -> Catalogue:
    """Topics, series and popularity of the items; from a fresh generator of the config's
    seed, the same catalogue `generate` builds."""
    item_topic = rng.integers(0, config.num_topics, config.num_items)
    members = np.argsort(item_topic, kind="stable")
    counts = np.bincount(item_topic, minlength=config.num_topics)
    topic_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(config.num_items) - np.repeat(topic_start, counts)   # rank within the topic
    weight = 1.0 / (rank + 1.0) ** config.popularity_exponent
    totals = np.bincount(item_topic[members], weights=weight, minlength=config.num_topics)
    within = np.cumsum(weight) - np.repeat(np.cumsum(totals) - totals, counts)
    cdf = item_topic[members] + within / np.repeat(np.maximum(totals, 1e-12), counts)
    sequel = np.full(config.num_items, -1, dtype=np.int64)
    last = np.concatenate([topic_start[1:], [config.num_items]]) - 1
    follows = np.ones(config.num_items, dtype=bool)
    follows[last[counts > 0]] = False
    sequel[members[follows]] = members[np.flatnonzero(follows) + 1]
    share = np.empty(config.num_items)
    share[members] = weight / np.repeat(np.maximum(totals, 1e-12), counts)
    return Catalogue(item_topic, sequel, members, cdf, topic_start, share)


def draw_by_popularity(catalogue: Catalogue, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of `topics`, by popularity within that topic."""
    at = np.searchsorted(catalogue.cdf, topics + rng.random(len(topics)) * (1 - 1e-9))
    drawn: np.ndarray = catalogue.members[np.minimum(at, len(catalogue.members) - 1)]
    return drawn


def _chunk_events(config: SyntheticConfig, catalogue: Catalogue, users: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, position) columns of `users` sequences, repeats within a user dropped."""
    nonempty = np.flatnonzero(np.bincount(catalogue.item_topic, minlength=config.num_topics))
    k = min(config.tastes_per_user, len(nonempty))
    tastes = nonempty[np.argsort(rng.random((users, len(nonempty))), axis=1)[:, :k]]     # (U, k)
    lengths = config.min_length + rng.geometric(1 / (config.mean_length - config.min_length + 1), users) - 1
    lengths = np.minimum(lengths, 20 * config.mean_length)
    # Walk further than each length, so that after repeats are dropped most sequences still
    # reach it; each is then cut to its length.
    walks = lengths + lengths // 2 + 5
    current = draw_by_popularity(catalogue, tastes[np.arange(users), rng.integers(k, size=users)], rng)
    columns = [(np.arange(users), current)]
    for step in range(1, int(walks.max())):
        active = np.flatnonzero(walks > step)
        now = current[active]
        follow = (catalogue.sequel[now] >= 0) & (rng.random(len(active)) < config.next_in_series)
        stay = rng.random(len(active)) < config.stay_in_topic
        topic = np.where(stay, catalogue.item_topic[now], tastes[active, rng.integers(k, size=len(active))])
        chosen = np.where(follow, catalogue.sequel[now], draw_by_popularity(catalogue, topic, rng))
        current[active] = chosen
        columns.append((active, chosen))
    user = np.concatenate([c[0] for c in columns])
    item = np.concatenate([c[1] for c in columns])
    position = np.concatenate([np.full(len(c[0]), n) for n, c in enumerate(columns)])
    _, first = np.unique(user * config.num_items + item, return_index=True)   # nobody takes an item twice
    first.sort()                                                              # back to step order
    user, item = user[first], item[first]
    order = np.lexsort((position[first], user))
    user, item = user[order], item[order]
    starts = np.searchsorted(user, np.arange(users))
    rank = np.arange(len(user)) - starts[user]                                # position after the drops
    keep = rank < lengths[user]
    return user[keep], item[keep], rank[keep]


PROPERTY_COLUMNS = ("price", "brand")
BRANDS = 20


def item_properties(num_items: int, seed: int) -> list[dict[str, float | str]]:
    """A price (log-normal, whole cents) and one of BRANDS brands per item, for filters; from
    a generator of their own, so the events do not change with them."""
    rng = np.random.default_rng([seed, 1])
    prices = np.round(rng.lognormal(3.0, 1.0, num_items), 2)
    brands = rng.integers(0, BRANDS, num_items)
    return [{"price": float(p), "brand": f"brand{b}"} for p, b in zip(prices, brands, strict=True)]


def user_properties(first_tastes: list[int], num_topics: int, seed: int) -> list[dict[str, float | str]]:
    """What users say about themselves: a `favourite` topic that is one of their tastes 70% of
    the time (else any topic), and an `age` that says nothing, as real sign-up forms go."""
    rng = np.random.default_rng([seed, 2])
    honest = rng.random(len(first_tastes)) < 0.7
    any_topic = rng.integers(0, num_topics, len(first_tastes))
    ages = rng.integers(16, 70, len(first_tastes))
    return [{"favourite": f"topic{t if h else a}", "age": float(age)}
            for t, h, a, age in zip(first_tastes, honest, any_topic, ages, strict=True)]


def item_texts(config: SyntheticConfig, item_topic: np.ndarray) -> tuple[list[str], list[str]]:
    """Every item's text and tag ("" = none): from its topic's words for a `content_signal`
    share of items, a bland title for the rest; from a generator of their own."""
    words = [topic_words(t) for t in range(config.num_topics)]
    named = np.random.default_rng([config.seed, 3]).random(len(item_topic)) < config.content_signal
    texts = [f"The {words[t][0]} {words[t][1]} #{i}: a {words[t][2]} story" if says else f"Item #{i}"
             for i, (t, says) in enumerate(zip(item_topic.tolist(), named.tolist(), strict=True))]
    return texts, [f"topic{t}" if says else "" for t, says in zip(item_topic.tolist(), named.tolist(), strict=True)]


IMAGE = "image"  # the name synthetic item vectors go by


def image_vectors(config: SyntheticConfig, item_topic: np.ndarray) -> dict[str, np.ndarray]:
    """{"image": (I, image_dim)} unit vectors, each its topic's random direction mixed with
    noise of its own so that `image_signal` of its variance is the topic (the latent taste);
    {} when image_dim is 0. From a generator of their own."""
    if config.image_dim == 0:
        return {}
    rng = np.random.default_rng([config.seed, 4])
    directions = rng.standard_normal((config.num_topics, config.image_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    noise = rng.standard_normal((len(item_topic), config.image_dim)) / np.sqrt(config.image_dim)
    mixed = np.sqrt(config.image_signal) * directions[item_topic] + np.sqrt(1 - config.image_signal) * noise
    mixed /= np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)
    return {IMAGE: mixed.astype(np.float32)}


def write_parquet(config: SyntheticConfig, folder: Path, progress: Callable[[int, int], None] = lambda d, t: None
                  ) -> tuple[Path, Path, int]:
    """Write `interactions.parquet` (user, item, timestamp; users in chunks) and `items.csv`.
    Returns both paths and the number of interactions. `progress(users done, users)`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    catalogue = catalogue_of(config, rng)
    interactions, items = folder / "interactions.parquet", folder / "items.csv"
    item_ids = pa.array([f"i{i}" for i in range(config.num_items)], pa.string())
    schema = pa.schema([("user", pa.dictionary(pa.int32(), pa.string())),
                        ("item", pa.dictionary(pa.int32(), pa.string())), ("timestamp", pa.int64())])
    total = 0
    with pq.ParquetWriter(interactions, schema) as writer:
        for start in range(0, config.num_users, USERS_PER_CHUNK):
            users = min(USERS_PER_CHUNK, config.num_users - start)
            user, item, position = _chunk_events(config, catalogue, users, rng)
            # A global clock: each user starts at a random second of a 30-day window and then
            # takes one item an hour, so recent popularity has a time cut to use.
            start_s = rng.integers(0, 30 * 86_400, users)
            user_ids = pa.array([f"u{u}" for u in range(start, start + users)], pa.string())
            writer.write_table(pa.table({
                "user": pa.DictionaryArray.from_arrays(pa.array(user.astype(np.int32)), user_ids),
                "item": pa.DictionaryArray.from_arrays(pa.array(item.astype(np.int32)), item_ids),
                "timestamp": pa.array(start_s[user] + 3600 * position)}, schema=schema))
            total += len(user)
            progress(start + users, config.num_users)
    texts, tags = item_texts(config, catalogue.item_topic)
    images = image_vectors(config, catalogue.item_topic).get(IMAGE)
    with items.open("w", newline="", encoding="utf-8") as f:
        writer_csv = csv.writer(f)
        writer_csv.writerow(["item", "text", "tags", *PROPERTY_COLUMNS,
                             *([COLUMN_PREFIX + IMAGE] if images is not None else [])])
        properties = item_properties(config.num_items, config.seed)
        writer_csv.writerows([f"i{i}", text, tag, *(p[name] for name in PROPERTY_COLUMNS),
                              *([format_vector(images[i])] if images is not None else [])]
                             for i, (text, tag, p) in enumerate(zip(texts, tags, properties, strict=True)))
    return interactions, items, total
