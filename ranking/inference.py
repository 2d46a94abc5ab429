"""The serving-time model: one bundle's query encoder and ranker behind plain numpy calls.

`RankingModel` holds no gRPC: the Ranking servicer, the in-process funnel (`bench.in_process`) and the
evaluation all call it. Training builds its features with the same helpers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ranking.config import ModelConfig
from ranking.devices import resolve_device
from ranking.item_encoder import MAX_TAGS, ItemEncoder, tag_rows
from ranking.query_encoder import QueryEncoder
from ranking.ranker import Ranker
from ranking.text_encoder import TextEncoder
from recdata.bundle import Bundle, load_bundle, load_weights
from recdata.channels import CHANNELS, SEMANTIC, SEQUENTIAL, channel_flags
from recdata.vectors import unit_rows

SEMANTIC_RECENCY_DECAY = 0.9  # weight of the k-th most recent item's text is decay**k


def pad_left(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, max_len) item rows (catalogue index + 1, 0 = padding) keeping each history's
    most recent `max_len` items, and the (B, max_len) padding mask.

    Always `max_len` wide: the encoders learned positions on windows of that width, with the
    latest item last, so a short history must sit at the same positions when served alone
    as in a batch or in training.
    """
    rows = np.zeros((len(histories), max_len), dtype=np.int64)
    for b, history in enumerate(histories):
        recent = np.asarray(history[-max_len:], dtype=np.int64)
        if len(recent):
            rows[b, max_len - len(recent):] = recent + 1
    padded = torch.from_numpy(rows)
    return padded, padded == 0


def semantic_queries(text_vectors: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """(B, text_dim) recency-weighted mean of each history's text vectors, unit length."""
    out = np.zeros((len(histories), text_vectors.shape[1]), dtype=np.float32)
    for b, history in enumerate(histories):
        if len(history) == 0:
            continue
        weights = SEMANTIC_RECENCY_DECAY ** np.arange(len(history))[::-1]
        mean = weights @ text_vectors[np.asarray(history)]
        norm = np.linalg.norm(mean)
        out[b] = mean / norm if norm > 0 else mean
    return out


def candidate_features(
    user: torch.Tensor,            # (B, d) sequential query vectors
    semantic: torch.Tensor,        # (B, D_text) semantic query vectors
    vectors: torch.Tensor,         # (B, C, d) candidate item vectors
    texts: torch.Tensor,           # (B, C, D_text) candidate text vectors
    log_popularity: torch.Tensor,  # (B, C) log1p of training interactions
    follow_share: torch.Tensor,    # (B, C) share of the last history item's next steps to it
    proposed_by: torch.Tensor,     # (B, C, n_channels) 0/1 flags
) -> torch.Tensor:
    """(B, C, F) ranker side features in the order `ranker.NUM_SCORE_FEATURES` names."""
    seq_score = (vectors * user.unsqueeze(1)).sum(-1)
    sem_score = (texts * semantic.unsqueeze(1)).sum(-1)
    known = (log_popularity > 0).to(vectors.dtype)  # cold items: no interactions to learn from yet
    scores = torch.stack([seq_score, sem_score, log_popularity, known, follow_share.to(vectors.dtype)], dim=-1)
    return torch.cat([scores, proposed_by], dim=-1)


class NextItems:
    """Each trained item's most frequent next items in the training histories and their
    shares (`recdata.item_stats.next_item_shares`): what the ranker's follow share reads.
    Catalogue indexes of trained items never move, so upserts leave this table as it is."""

    def __init__(self, ids: np.ndarray | torch.Tensor, shares: np.ndarray | torch.Tensor, device: torch.device):
        self.ids = torch.as_tensor(ids, dtype=torch.long, device=device)      # (I, N), -1 = none
        self.shares = torch.as_tensor(shares, dtype=torch.float32, device=device)

    def to(self, device: torch.device) -> NextItems:
        return NextItems(self.ids, self.shares, device)

    def share_after(self, histories: list[np.ndarray], candidates: torch.Tensor) -> torch.Tensor:
        """(B, C) the share of the last history item's next steps in training that went to
        each candidate; 0 without a history, or where the last item joined after training.
        Costs B x C x N comparisons, whatever the catalogue's size."""
        last = torch.tensor([int(h[-1]) if len(h) else -1 for h in histories], device=self.ids.device)
        known = (last >= 0) & (last < len(self.ids))
        rows = torch.where(known, last, torch.zeros_like(last))
        match = self.ids[rows].unsqueeze(1) == candidates.unsqueeze(2)           # (B, C, N)
        shares = (match * self.shares[rows].unsqueeze(1)).sum(-1)
        return shares * known.unsqueeze(1)


def mmr_order(scores: np.ndarray, vectors: np.ndarray | None, k: int, diversity: float) -> np.ndarray:
    """Maximal marginal relevance: the k positions chosen greedily by
    (1 - diversity) * relevance - diversity * (highest cosine to an item already chosen).

    Relevance is the score min-max scaled to [0, 1], so the trade-off does not depend on
    the ranker's score scale; `vectors` are unit rows (unused, and may be None, when
    diversity = 0, which is the order by score).
    """
    k = min(k, len(scores))
    by_score = np.argsort(-scores, kind="stable")
    if diversity <= 0 or k <= 1:
        return by_score[:k]
    if vectors is None:
        raise ValueError(f"diversity={diversity} (MMR) needs the candidates' vectors")
    finite = np.isfinite(scores)
    low, high = (scores[finite].min(), scores[finite].max()) if finite.any() else (0.0, 1.0)
    relevance = np.where(finite, (scores - low) / max(high - low, 1e-12), -1.0)
    chosen = [int(by_score[0])]
    closest = vectors @ vectors[chosen[0]]               # (C,) highest similarity to the chosen set
    available = np.ones(len(scores), dtype=bool)
    available[chosen[0]] = False
    while len(chosen) < k:
        gain = np.where(available, (1 - diversity) * relevance - diversity * closest, -np.inf)
        best = int(np.argmax(gain))
        chosen.append(best)
        available[best] = False
        closest = np.maximum(closest, vectors @ vectors[best])
    return np.asarray(chosen)


# Lists shorter than this keep every place for relevance alone.
NEW_ITEM_SLOT_MIN_K = 5


def with_new_item_slot(order: np.ndarray, scores: np.ndarray, is_new: np.ndarray, k: int,
                       place: int | None = None) -> np.ndarray:
    """The chosen positions `order`, with the best-scored new candidate (one without training
    interactions) at `place` (1-based; None or beyond the list: the last) when none was
    chosen and the list has NEW_ITEM_SLOT_MIN_K places or more; the others keep their order.

    Why a reserved place: the ranker scores a new item from its content alone, and evidence
    from content is weaker than evidence from interactions, so a calibrated ranker rarely
    puts a new item in the top k; without exposure it never gathers the interactions that
    would let it compete. The ranker still chooses which new item; where it goes is a serving
    choice (an experiment can try a higher place against the last).
    """
    if k < NEW_ITEM_SLOT_MIN_K or len(order) < k or is_new[order].any():
        return order
    waiting = np.flatnonzero(is_new & np.isfinite(scores))
    if len(waiting) == 0:
        return order
    best_new = waiting[np.argmax(scores[waiting])]
    at = k - 1 if place is None else min(place, k) - 1
    return np.insert(order[: k - 1], at, best_new)


@dataclass(frozen=True)
class RankCall:
    """One served Rank request, as `RankingModel.rank_many` takes them."""

    history_ids: list[str]
    candidates: list[tuple[str, int]]   # item id, CHANNEL_BITS of the channels that proposed it
    k: int
    diversity: float = 0.0
    explain_top: int = 0
    # The best new item's place (see `with_new_item_slot`), 1-based; None: the last; 0: none kept.
    new_item_place: int | None = None


@dataclass(frozen=True)
class RankedCandidates:
    scores: np.ndarray          # (C,) higher is better
    attention: np.ndarray       # (C, T) each candidate's attention over the padded history window
    history_length: int

    def because(self, candidate: int, top: int) -> list[int]:
        """Positions in the caller's history of the `top` items that drove a candidate's score,
        most weight first. Computed on demand: only the items returned are ever explained."""
        T = self.attention.shape[1]
        shown = min(self.history_length, T)  # the window keeps the most recent T items
        if top <= 0 or shown == 0:
            return []
        recent = self.attention[candidate, T - shown :]
        best = np.argsort(-recent, kind="stable")[:top]
        return [int(self.history_length - shown + p) for p in best]


class InvalidItems(ValueError):
    """Items a model version cannot encode as given (a vector it does not fuse, a wrong size)."""


@dataclass(frozen=True)
class ItemTables:
    """Everything per item the models read. Replaced whole on upsert, never edited in place,
    so a request that took one `ItemTables` sees one consistent catalogue."""

    item_ids: list[str]
    item_index: dict[str, int]
    item_vectors: torch.Tensor    # (I, d) sequential-channel vectors
    text_vectors: np.ndarray      # (I, D_text) LM vectors (semantic channel)
    text_tensor: torch.Tensor     # the same on the model's device
    popularity: np.ndarray        # (I,) training interactions per item
    log_popularity: torch.Tensor  # (I,) log1p of it, on the device
    input_table: torch.Tensor     # (I + 1, d) encoder input, row 0 = padding

    @classmethod
    def build(cls, item_ids: list[str], item_vectors: np.ndarray, text_vectors: np.ndarray,
              popularity: np.ndarray, device: torch.device) -> ItemTables:
        vectors = torch.from_numpy(np.ascontiguousarray(item_vectors, dtype=np.float32)).to(device)
        return cls(
            item_ids=item_ids,
            item_index={item_id: n for n, item_id in enumerate(item_ids)},
            item_vectors=vectors,
            text_vectors=text_vectors,
            text_tensor=torch.from_numpy(text_vectors).to(device),
            popularity=popularity,
            log_popularity=torch.from_numpy(np.log1p(popularity).astype(np.float32)).to(device),
            input_table=torch.cat([torch.zeros_like(vectors[:1]), vectors]),
        )


class QueryCache:
    """The query vectors of the histories encoded last, per history.

    The gateway sends a request's history to Encode and, a few milliseconds later, the same
    history to Rank: the ranker reuses what Encode computed rather than run the query
    encoder twice (it was a sixth of the ranking service's time under load). Entries belong
    to one `ItemTables`; an upsert replaces the tables, and with them the entries.
    """

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._entries: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()
        self._tables: ItemTables | None = None
        self._lock = threading.Lock()  # Encode and Rank batches, and upserts, may run on other threads

    def get(self, tables: ItemTables, history: np.ndarray) -> dict[str, np.ndarray] | None:
        with self._lock:
            if tables is not self._tables:
                return None
            key = history.tobytes()
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, tables: ItemTables, history: np.ndarray, vectors: dict[str, np.ndarray]) -> None:
        with self._lock:
            if tables is not self._tables:
                self._entries.clear()
                self._tables = tables
            self._entries[history.tobytes()] = vectors
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


class RankingModel:
    """Query encoder + ranker of one bundle, for inference on CPU or GPU."""

    def __init__(self, bundle: Bundle, query_encoder: QueryEncoder, ranker: Ranker, device: torch.device,
                 folder: Path | None = None):
        self.bundle = bundle
        self.folder = folder
        self.version = bundle.version
        self.config = query_encoder.config
        self.device = device
        self.tables = ItemTables.build(list(bundle.item_ids), bundle.arrays[SEQUENTIAL], bundle.arrays[SEMANTIC],
                                       bundle.arrays["popularity"], device)
        self.next_items = NextItems(bundle.arrays["next_item_ids"], bundle.arrays["next_item_shares"], device)
        self.query_encoder = query_encoder.to(device).eval()
        self.ranker = ranker.to(device).eval()
        self.item_encoder: ItemEncoder | None = None
        self.text_encoder: TextEncoder | None = None
        self._upsert_lock = threading.Lock()
        self.queries = QueryCache()

    @classmethod
    def load(cls, folder: Path, device: str | None = None) -> RankingModel:
        """Load a bundle folder; `device` defaults to CUDA when present, else CPU."""
        target = resolve_device(device)
        bundle = load_bundle(folder)
        config = ModelConfig.from_dict(bundle.manifest["model"])
        encoder = QueryEncoder(config)
        encoder.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(folder, "query_encoder").items()})
        ranker = Ranker(config, num_channels=len(CHANNELS))
        ranker.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(folder, "ranker").items()})
        return cls(bundle, encoder, ranker, target, folder)

    def indexes(self, item_ids: list[str], tables: ItemTables | None = None) -> np.ndarray:
        """Catalogue indexes of the ids this version knows, in order; unknown ids are skipped."""
        index = (tables or self.tables).item_index
        return np.asarray([index[i] for i in item_ids if i in index], dtype=np.int64)

    def encode(self, histories: list[np.ndarray], tables: ItemTables | None = None) -> dict[str, np.ndarray]:
        """Per channel, (B, dim) query vectors; users without history get zero vectors.

        Histories encoded lately come from `queries`; the rest go through the encoder together."""
        tables = tables or self.tables
        histories = [np.asarray(h, dtype=np.int64) for h in histories]
        if not histories:
            return self._encode(histories, tables)
        known = {n: vectors for n, history in enumerate(histories)
                 if (vectors := self.queries.get(tables, history)) is not None}
        missing = [n for n in range(len(histories)) if n not in known]
        if missing:
            computed = self._encode([histories[n] for n in missing], tables)
            for row, n in enumerate(missing):
                known[n] = {channel: vectors[row] for channel, vectors in computed.items()}
                self.queries.put(tables, histories[n], known[n])
        return {channel: np.stack([known[n][channel] for n in range(len(histories))])
                for channel in (SEQUENTIAL, SEMANTIC)}

    @torch.inference_mode()
    def _encode(self, histories: list[np.ndarray], tables: ItemTables) -> dict[str, np.ndarray]:
        padded, padding = pad_left(histories, self.config.max_len)
        padded, padding = padded.to(self.device), padding.to(self.device)
        users = self.query_encoder(tables.input_table[padded], padding, last_only=True)[:, -1]  # (B, d)
        empty = torch.tensor([len(h) == 0 for h in histories], device=self.device)
        users = users.masked_fill(empty.unsqueeze(-1), 0.0)
        return {
            SEQUENTIAL: users.float().cpu().numpy(),
            SEMANTIC: semantic_queries(tables.text_vectors, histories),
        }

    @torch.inference_mode()
    def rank(self, history: np.ndarray, candidates: np.ndarray, channel_masks: np.ndarray,
             tables: ItemTables | None = None) -> RankedCandidates:
        """Score one user's candidates (catalogue indexes), each with its channel mask (the
        `recdata.channels.CHANNEL_BITS` of the channels that proposed it).

        Pass the `tables` the indexes were looked up in when the call must not see an upsert
        that lands meanwhile.
        """
        return self.rank_batch([history], [candidates], [channel_masks], tables)[0]

    @torch.inference_mode()
    def rank_batch(self, histories: list[np.ndarray], candidates: list[np.ndarray],
                   channel_masks: list[np.ndarray], tables: ItemTables | None = None
                   ) -> list[RankedCandidates]:
        """`rank` for several users in one model call; each user's scores equal its own call's.

        Candidate lists are padded to the longest; every candidate is scored on its own (it
        attends over its user's history only), so padding changes no real score.
        """
        tables = tables or self.tables
        B, width = len(histories), max((len(c) for c in candidates), default=0)
        if width == 0:
            return [RankedCandidates(np.zeros(0, np.float32), np.zeros((0, 0), np.float32), len(h))
                    for h in histories]
        queries = self.encode(histories, tables)
        padded, padding = pad_left(histories, self.config.max_len)
        padded, padding = padded.to(self.device), padding.to(self.device)
        rows = np.zeros((B, width), dtype=np.int64)
        flags = np.zeros((B, width, len(CHANNELS)), dtype=np.float32)
        for b, (rows_b, masks_b) in enumerate(zip(candidates, channel_masks, strict=True)):
            rows[b, : len(rows_b)] = rows_b
            # Unpacked in numpy: a Python loop over the candidates here took 7% of the ranking
            # service's time under load.
            flags[b, : len(rows_b)] = channel_flags(masks_b)
        cand = torch.from_numpy(rows).to(self.device)                          # (B, C)
        user = torch.from_numpy(queries[SEQUENTIAL]).to(self.device)
        semantic = torch.from_numpy(queries[SEMANTIC]).to(self.device)
        vectors = tables.item_vectors[cand]
        features = candidate_features(user, semantic, vectors, tables.text_tensor[cand], tables.log_popularity[cand],
                                      self.next_items.share_after(histories, cand),
                                      torch.from_numpy(flags).to(self.device))
        scores, weights = self.ranker(tables.input_table[padded], padding, user, vectors, features)
        scores = scores.float().cpu().numpy()
        attention = weights.float().cpu().numpy()                              # (B, C, T)
        return [RankedCandidates(scores[b, : len(candidates[b])], attention[b, : len(candidates[b])], len(history))
                for b, history in enumerate(histories)]

    def rank_items(self, history_ids: list[str], candidates: list[tuple[str, int]], k: int,
                   diversity: float = 0.0, explain_top: int = 0, new_item_place: int | None = None
                   ) -> list[tuple[str, float, list[str]]]:
        """The served Rank: (item id, score, because ids) best first, k of them. Candidates
        come with their channel masks, as on the wire (`recdata.channels.channel_mask`);
        `new_item_place` as RankRequest's (None: the last place; 0: none kept)."""
        return self.rank_many([RankCall(history_ids, candidates, k, diversity, explain_top, new_item_place)])[0]

    def rank_many(self, calls: Sequence[RankCall]) -> list[list[tuple[str, float, list[str]]]]:
        """Several served Rank calls scored in one model call.

        Items are ordered by score, or by MMR when diversity > 0; candidates this version does
        not know come last with score -inf rather than failing the call. Ids are looked up in
        one snapshot of the item tables, so an upsert landing meanwhile cannot mix catalogues.
        """
        tables = self.tables
        histories, known_histories, knowns, rows = [], [], [], []
        for call in calls:
            known_history = [i for i in call.history_ids if i in tables.item_index]
            known_histories.append(known_history)
            histories.append(np.asarray([tables.item_index[i] for i in known_history], dtype=np.int64))
            known = [(i, mask) for i, mask in call.candidates if i in tables.item_index]
            knowns.append(known)
            rows.append(np.asarray([tables.item_index[i] for i, _ in known], dtype=np.int64))
        masks = [np.asarray([mask for _, mask in known], dtype=np.int64) for known in knowns]
        ranked = self.rank_batch(histories, rows, masks, tables)
        answers = []
        for call, known_history, known, rows_b, ranked_b in zip(calls, known_histories, knowns, rows, ranked,
                                                                strict=True):
            # Only MMR reads the item vectors.
            vectors = tables.item_vectors[torch.from_numpy(rows_b)].cpu().numpy() if call.diversity > 0 else None
            order = mmr_order(ranked_b.scores, vectors, call.k, call.diversity)
            if call.new_item_place != 0:
                order = with_new_item_slot(order, ranked_b.scores, tables.popularity[rows_b] == 0, call.k,
                                           call.new_item_place)
            out = [(known[n][0], float(ranked_b.scores[n]),
                    [known_history[p] for p in ranked_b.because(n, call.explain_top)])
                   for n in order]
            if len(out) < call.k:
                known_ids = {i for i, _ in known}
                out += [(i, float("-inf"), []) for i, _ in call.candidates if i not in known_ids][: call.k - len(out)]
            answers.append(out)
        return answers

    def encode_many(self, histories: Sequence[list[str]]) -> list[dict[str, np.ndarray]]:
        """The served Encode for several users in one model call: per user, a vector per
        channel, or {} when the user has no item this version knows."""
        tables = self.tables
        rows = [self.indexes(h, tables) for h in histories]
        active = [n for n, r in enumerate(rows) if len(r)]
        out: list[dict[str, np.ndarray]] = [{} for _ in histories]
        if active:
            vectors = self.encode([rows[n] for n in active], tables)
            for b, n in enumerate(active):
                out[n] = {channel: v[b] for channel, v in vectors.items()}
        return out

    def item_queries(self, item_ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """Query vectors of items themselves, for "items like these": per channel the unit mean of
        their vectors (item tower and LM text), which the recall indexes search by inner
        product; and the ids this version does not know. No vectors when it knows none."""
        tables = self.tables
        unknown = [i for i in item_ids if i not in tables.item_index]
        rows = self.indexes(list(item_ids), tables)
        if len(rows) == 0:
            return {}, unknown
        with torch.inference_mode():
            sequential = tables.item_vectors[torch.from_numpy(rows)].float().mean(0).cpu().numpy()
        semantic = tables.text_vectors[rows].mean(0)
        return {channel: (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
                for channel, v in ((SEQUENTIAL, sequential), (SEMANTIC, semantic))}, unknown

    # ---- live catalogue changes ---------------------------------------------------------------
    def prepare_item_encoding(self, text_encoder: TextEncoder | None = None) -> tuple[ItemEncoder, TextEncoder]:
        """Load the item encoder and the language model, so new items can be encoded from text."""
        if self.item_encoder is not None and self.text_encoder is not None:
            return self.item_encoder, self.text_encoder
        if self.folder is None:
            raise RuntimeError("item encoding needs the bundle folder's item_encoder weights")
        vocabulary = list(self.bundle.manifest.get("tag_vocabulary", []))
        text = self.bundle.arrays[SEMANTIC]
        encoder = ItemEncoder(self.config, text, np.zeros((len(text), MAX_TAGS), np.int64), len(vocabulary),
                              vector_dims=self.vector_dims)
        encoder.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(self.folder, "item_encoder").items()})
        self.tag_vocabulary = vocabulary
        self.text_encoder = text_encoder or TextEncoder(device=str(self.device))
        self.item_encoder = encoder.to(self.device).eval()
        return self.item_encoder, self.text_encoder

    @property
    def vector_dims(self) -> dict[str, int]:
        """The precomputed item vectors this version fuses, name -> size."""
        return {str(k): int(v) for k, v in (self.bundle.manifest.get("item_vectors") or {}).items()}

    def check_item_vectors(self, vectors: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Refuse vectors this version cannot read, naming the item and what it takes."""
        dims = self.vector_dims
        for n, named in enumerate(vectors):
            for name, vector in named.items():
                if name not in dims:
                    takes = ", ".join(f"{k} ({d})" for k, d in sorted(dims.items())) or "none"
                    raise InvalidItems(f"items[{n}].vectors[{name!r}]: model version {self.version} "
                                       f"fuses no vector of that name; it takes: {takes}")
                if vector.shape != (dims[name],):
                    raise InvalidItems(f"items[{n}].vectors[{name!r}] has {vector.size} numbers; "
                                       f"this model version's {name!r} vectors have {dims[name]}")

    def _vector_inputs(self, vectors: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """name -> (N, d) unit vectors on the device, zeros for items without that vector."""
        inputs = {}
        for name, dim in self.vector_dims.items():
            table = np.zeros((len(vectors), dim), np.float32)
            for n, named in enumerate(vectors):
                if name in named:
                    table[n] = named[name]
            inputs[name] = torch.from_numpy(unit_rows(table)).to(self.device)
        return inputs

    @torch.inference_mode()
    def upsert_items(self, item_ids: list[str], texts: list[str], tags: list[tuple[str, ...]],
                     vectors: Sequence[Mapping[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """Encode items from text, tags and precomputed vectors and make them rankable;
        returns (N, dim) per channel.

        An item this version trained on keeps its ID embedding (its behaviour so far) with the
        new content; a new item is encoded from its content alone, as cold items are in training.
        """
        vectors = vectors if vectors is not None else [{} for _ in item_ids]
        if not len(item_ids) == len(texts) == len(tags) == len(vectors):
            raise ValueError(f"{len(item_ids)} ids, {len(texts)} texts, {len(tags)} tag lists and "
                             f"{len(vectors)} vector sets must match")
        self.check_item_vectors(vectors)
        item_encoder, text_encoder = self.prepare_item_encoding()
        text = text_encoder.encode(texts)                                          # (N, D_text)
        tag_ids = torch.from_numpy(tag_rows(tags, self.tag_vocabulary)).to(self.device)
        extra = self._vector_inputs(vectors)
        with self._upsert_lock:  # one writer at a time; readers keep their snapshot
            tables = self.tables
            trained = len(self.bundle.item_ids)
            rows = [tables.item_index.get(i, -1) for i in item_ids]
            known = self.bundle.arrays["popularity"]
            id_rows = torch.tensor([r + 1 if 0 <= r < trained and known[r] > 0 else 0 for r in rows],
                                   device=self.device)
            # Row 0 of the ID table is not zero (its initialisation is kept): a new item gets no ID part at all.
            id_part = item_encoder.id_embedding(id_rows) * (id_rows > 0).unsqueeze(-1)
            fused = item_encoder.fuse(id_part,
                                      torch.from_numpy(text).to(self.device), tag_ids, extra).cpu().numpy()
            all_ids = list(tables.item_ids)
            all_vectors = tables.item_vectors.cpu().numpy().copy()
            all_text = tables.text_vectors.copy()
            new = [n for n, r in enumerate(rows) if r < 0]
            for n, r in enumerate(rows):
                if r >= 0:
                    all_vectors[r], all_text[r] = fused[n], text[n]
            all_ids += [item_ids[n] for n in new]
            all_vectors = np.vstack([all_vectors, fused[new]])
            all_text = np.vstack([all_text, text[new]])
            popularity = np.concatenate([tables.popularity, np.zeros(len(new), np.float32)])
            self.tables = ItemTables.build(all_ids, all_vectors, all_text, popularity, self.device)
        return {SEQUENTIAL: fused, SEMANTIC: text}
