"""Training of the query encoder and the ranker on one data set, written out as a bundle.

Phase 1 trains item + query encoder with sampled softmax (uniform and in-batch negatives,
logQ-corrected) and early stopping on validation NDCG@10 of recall. Phase 2 trains the
ranker listwise on the candidates the recall stage really returns (hard negatives).
"""

from __future__ import annotations

import ctypes
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ranking.config import TrainConfig
from ranking.devices import resolve_device
from ranking.evaluation import Evaluation, FunnelScorer, user_sample
from ranking.inference import NextItems
from ranking.item_encoder import ItemEncoder, tag_matrix
from ranking.losses import sampled_softmax
from ranking.optim import LazyAdamW
from ranking.query_encoder import QueryEncoder
from ranking.ranker import Ranker
from ranking.scores import SeenItems
from ranking.text_encoder import TextEncoder, default_disk_cache, default_model_dir
from recdata.bundle import Bundle, load_weights, new_version_id
from recdata.channels import CHANNELS, SEMANTIC, SEQUENTIAL, popular_scores, tuning_queries_name
from recdata.dataset import Dataset
from recdata.item_stats import RECENT_SHARE, cooccurrence_neighbours, next_item_shares, recent_popularity
from recdata.segments import SegmentCounts
from recdata.split import Split, leave_last_two
from retrieval.index import build_index

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, float]], None]
# (phase, done, total): how far a long phase is, for a progress bar; phases are "text encoding"
# (texts), "encoder epoch N" and "ranker epoch N" (steps), "bundle" (0 or 1 of 1).
PhaseProgress = Callable[[str, int, int], None]
# Where the trainer's random draws (negatives, shuffles, cold candidates) are made, whatever
# device it computes on: the CPU generator's stream is what seeds and checkpoints pin down.
CPU = torch.device("cpu")


@dataclass
class TrainResult:
    folder: Path
    version: str
    metrics: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: stage, seconds, NDCG@10


@dataclass
class PhaseState:
    """Where a training phase stands after its latest epoch: what a checkpoint holds."""

    phase: str                                   # "encoder" or "ranker"
    epoch: int = 0                               # epochs completed
    best: float = -1.0                           # best validation NDCG@10 so far
    start: float = -1.0                          # validation NDCG@10 before the phase trained
    stale: int = 0                               # epochs since it improved
    best_state: dict[str, torch.Tensor] | None = None
    curve: list[dict[str, float]] = field(default_factory=list)  # every epoch of every phase so far
    optimiser: dict[str, Any] | None = None      # the optimiser's state_dict, when restored
    rng: dict[str, Any] = field(default_factory=dict)  # the phase's random streams


class DataParallel(Protocol):
    """Data-parallel training across processes (`cluster.train_ray` runs it on Ray Train).

    Every replica sees its share of each epoch's batches; gradients are averaged before
    each step, so the replicas' models stay identical and so do their stop decisions."""

    rank: int
    world: int

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None: ...

    def any(self, flag: bool) -> bool: ...

    def epoch_done(self, trainer: Trainer, state: PhaseState, optimiser: torch.optim.Optimizer) -> None: ...


class WindowShard(Protocol):
    """This replica's share of the encoder's training windows, streamed from elsewhere (a Ray
    Dataset shard in `cluster.train_ray`), so that no replica holds the whole table. Shards are
    disjoint and together cover every window each epoch; their lengths may differ by a batch."""

    rows: int  # about how many windows each epoch brings this replica, for progress

    def numbered(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The epoch's windows in a seeded order, batch by batch: (B, 1 + max_len + 1), each
        window's number (its row in `training_windows`) and then the window."""
        ...


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> None:
    """Let the C allocator keep freed memory for reuse rather than give it back to the OS.

    Every training step allocates and frees the same large tensors (the sampled-softmax
    logits are tens of MB). glibc serves blocks that large with a fresh mmap and unmaps them
    at free, so each step page-faults them in again, and in a non-main thread (where Ray
    Train runs the loop) its per-thread heaps are trimmed eagerly too. Raised thresholds
    make the memory reusable: ML-100K encoder epochs take about a third less time. Written
    by hand because no library sets this; glibc only, a no-op elsewhere. It holds for the
    whole process, so only training calls it, never a serving process.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for parameter in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        if libc.mallopt(parameter, KEEP_FREED_BYTES) != 1:
            log.warning("mallopt(%d) refused; training keeps glibc's default allocation", parameter)


def stop_report(phase: str, curve: list[dict[str, float]], budget_s: float, seconds: float, epochs: int,
                max_epochs: int, out_of_patience: bool = False) -> dict[str, Any]:
    """Why a phase ended, and whether validation was still rising when a time budget ended it:
    the last epoch beat every earlier one. Such a stop is logged as a warning with the figures."""
    scores = [p["ndcg@10"] for p in curve]
    still_improving = len(scores) >= 2 and scores[-1] > max(scores[:-1])
    if epochs >= max_epochs:
        reason = "epochs"
    elif out_of_patience:
        reason = "patience"
    elif seconds > budget_s:
        reason = "time budget"
    else:
        reason = "other replica"  # data-parallel replicas stop together when any one would
    # A budget (of time or of epochs) cut it while it still improved: more would have helped.
    report = {"reason": reason, "epochs": epochs, "seconds": round(seconds, 1),
              "still_improving": bool(still_improving and reason in ("time budget", "epochs"))}
    if report["still_improving"]:
        budget = f"{budget_s:.0f} s time budget" if reason == "time budget" else f"{max_epochs} epoch budget"
        log.warning("the %s phase was stopped by its %s after %d epochs while validation NDCG@10 still "
                    "improved (%.4f after %.4f): raise its budget to train it further",
                    phase, budget, epochs, scores[-1], max(scores[:-1]))
    return report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encoder_windows(dataset: Dataset, config: TrainConfig) -> np.ndarray:
    """The encoder phase's training table for `dataset`, as a `Trainer` would build it."""
    return training_windows(leave_last_two(dataset).train, config.model.max_len)


def window_layout(sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each training window's user and where its span ends (exclusive) in that user's
    sequence, in `training_windows`' order: a window ending at `end` holds positions
    end - max_len - 1 .. end - 1, left-padded where those start before the sequence."""
    users: list[int] = []
    ends: list[int] = []
    for user, seq in enumerate(sequences):
        spans = range(len(seq), 1, -max_len)
        users.extend([user] * len(spans))
        ends.extend(spans)
    return np.asarray(users, np.int64), np.asarray(ends, np.int64)


def training_windows(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """(N, max_len + 1) left-padded windows (item index + 1) covering every position once."""
    windows = []
    for user, end in zip(*window_layout(sequences, max_len), strict=True):
        chunk = np.asarray(sequences[user][max(0, end - max_len - 1) : end], dtype=np.int64) + 1
        windows.append(np.pad(chunk, (max_len + 1 - len(chunk), 0)))
    return np.stack(windows) if windows else np.zeros((0, max_len + 1), np.int64)


# Disliked items kept per user as training negatives: the most recent ones.
MAX_TRAINING_NEGATIVES = 32


class EventWeights:
    """What a training window's positions weigh (their events' weights) and which items its
    user disliked, looked up by window number, so that neither travels with the windows: the
    windows table (and a Ray Train shard of it) stays item indexes alone. Memory: one float
    an interaction, two integers a window and a user, `MAX_TRAINING_NEGATIVES` integers a
    user who disliked something."""

    def __init__(self, split: Split, negatives: list[np.ndarray], max_len: int, device: torch.device):
        self.max_len = max_len
        users, ends = window_layout(split.train, max_len)
        self.window_users, self.window_ends = torch.from_numpy(users), torch.from_numpy(ends)
        self.weighted = split.train_weights is not None
        if split.train_weights is not None:
            lengths = np.array([len(w) for w in split.train_weights], np.int64)
            self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
            flat = np.concatenate(split.train_weights) if len(lengths) else np.zeros(0)
            self.flat = torch.from_numpy(np.append(flat, 1.0).astype(np.float32))  # last: padding's
        self.with_negatives = any(len(items) for items in negatives)
        # Only users with dislikes take a row; everyone else reads the all-padding row 0.
        disliking = [u for u, items in enumerate(negatives[: len(split.train)]) if len(items)]
        row_of = np.zeros(len(split.train), np.int64)
        row_of[disliking] = np.arange(1, len(disliking) + 1)
        table = np.full((len(disliking) + 1, MAX_TRAINING_NEGATIVES), -1, np.int64)
        for row, user in enumerate(disliking, 1):
            recent = negatives[user][-MAX_TRAINING_NEGATIVES:]
            table[row, : len(recent)] = recent
        self.negative_row = torch.from_numpy(row_of)
        self.negatives = torch.from_numpy(table).to(device)
        self.device = device

    def position_weights(self, numbers: torch.Tensor) -> torch.Tensor:
        """(B, max_len + 1) weights of the windows `numbers`; padding positions weigh 1."""
        users, ends = self.window_users[numbers.cpu()], self.window_ends[numbers.cpu()]
        positions = ends[:, None] - (self.max_len + 1) + torch.arange(self.max_len + 1)
        index = torch.where(positions >= 0, self.offsets[users][:, None] + positions, len(self.flat) - 1)
        return self.flat[index].to(self.device)

    def user_negatives(self, numbers: torch.Tensor) -> torch.Tensor:
        """(B, MAX_TRAINING_NEGATIVES) disliked items of each window's user, -1 padded."""
        return self.negatives[self.negative_row[self.window_users[numbers.cpu()]].to(self.device)]


def disliked_loss(users: torch.Tensor, positives: torch.Tensor, disliked: torch.Tensor,
                  present: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The softmax of each row's target against the items its user disliked: users (N, d),
    positives (N, d), disliked (N, M, d) with `present` (N, M) marking real ones. Rows with
    none add nothing; the rest are averaged (weighted as the main loss is)."""
    rows = present.any(1)
    if not rows.any():
        return users.new_zeros(())
    users, positives, disliked, present = users[rows], positives[rows], disliked[rows], present[rows]
    logits = torch.cat([(users * positives).sum(-1, keepdim=True),
                        torch.einsum("nd,nmd->nm", users, disliked).masked_fill(~present, -math.inf)], 1)
    losses = torch.logsumexp(logits, 1) - logits[:, 0]
    if weights is None:
        return losses.mean()
    weights = weights[rows]
    return (losses * weights).sum() / weights.sum()


class Funnel(torch.nn.Module):
    """The trainable models together: item encoder, query encoder and ranker."""

    def __init__(self, config: TrainConfig, text_vectors: np.ndarray, tag_index: np.ndarray, num_tags: int,
                 item_vectors: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.items = ItemEncoder(config.model, text_vectors, tag_index, num_tags, item_vectors)
        self.encoder = QueryEncoder(config.model)
        self.ranker = Ranker(config.model, num_channels=len(CHANNELS))


class Trainer:
    def __init__(self, dataset: Dataset, config: TrainConfig, text_encoder: TextEncoder | None = None,
                 progress: Progress | None = None, cold_items: np.ndarray | None = None,
                 text_vectors: np.ndarray | None = None, parallel: DataParallel | None = None,
                 resume: PhaseState | None = None, warm_start: Path | None = None,
                 phase_progress: PhaseProgress | None = None, shard: WindowShard | None = None):
        """`cold_items`: catalogue indexes whose training interactions are all removed (the
        cold-start protocol); they stay in the catalogue and in evaluation. `text_vectors`:
        the items' LM vectors when already computed (a bundle's), to skip encoding them.
        `parallel`: this process is one replica of data-parallel training; `resume`: go on
        from a checkpoint's phase state (its model weights already loaded into `model`).
        `warm_start`: a bundle over the same catalogue and model config whose weights training
        starts from (fine-tuning); each phase then keeps them unless it beats them on validation.
        `shard`: with `parallel`, this replica's training windows come from it instead of
        being built here from the whole data set."""
        if shard is not None and parallel is None:
            raise ValueError("a window shard is one replica's share: it needs `parallel`")
        self.dataset = dataset
        self.parallel = parallel
        self.shard = shard
        self.resume = resume
        self.encoder_curve: list[dict[str, float]] = []  # the finished encoder phase's epochs
        self.stops: dict[str, dict[str, Any]] = {}  # per finished phase, why it ended (`stop_report`)
        self.config = config
        self.progress = progress or (lambda stage, values: None)
        self.phase_progress = phase_progress or (lambda phase, done, total: None)
        keep_freed_memory()
        seed_everything(config.seed)
        torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.split: Split = leave_last_two(dataset)
        if cold_items is not None and len(cold_items):
            cold = np.zeros(dataset.num_items, dtype=bool)
            cold[cold_items] = True
            weights = self.split.train_weights
            self.split = replace(self.split, train=[s[~cold[s]] for s in self.split.train],
                                 train_weights=None if weights is None else [
                                     w[~cold[s]] for s, w in zip(self.split.train, weights, strict=True)])
        if config.use_text:
            if text_vectors is None:
                # Vectors are kept on disk by text hash: a second run over the same catalogue
                # (another config, the loop's next round, evaluate's baselines) encodes nothing again.
                text_encoder = text_encoder or TextEncoder(device=str(self.device), disk_cache=default_disk_cache())
                text_vectors = text_encoder.encode(
                    dataset.item_texts, progress=lambda done, total: self.phase_progress("text encoding", done, total))
            self.text_vectors = text_vectors
            # Given vectors come from the default model unless an encoder says otherwise; no
            # language model is loaded just to name it.
            self.text_model: str | None = (text_encoder.model_dir if text_encoder else default_model_dir()).name
            tags, self.tag_vocabulary = tag_matrix(dataset.item_tags)
            self.budgets = dict(config.candidates_per_channel)
        else:
            self.text_model = None
            self.text_vectors = np.zeros((dataset.num_items, 1), np.float32)
            tags, self.tag_vocabulary = tag_matrix([() for _ in dataset.item_ids])
            self.budgets = {c: k for c, k in config.candidates_per_channel if c != SEMANTIC}
        # Precomputed item vectors are content, as text is: an ID-only model reads neither.
        self.item_vectors = dataset.item_vectors if config.use_text and config.use_vectors else {}
        self.model = Funnel(config, self.text_vectors, tags, len(self.tag_vocabulary),
                            self.item_vectors).to(self.device)
        self.warm_start = warm_start
        if warm_start is not None:
            self._load_weights(warm_start)
        counts = np.bincount(np.concatenate(self.split.train), minlength=dataset.num_items)
        self.popularity = counts.astype(np.float32)
        self.model.items.id_known[1:] = torch.from_numpy((counts > 0).astype(np.float32))
        # Negatives come only from items with training interactions: the others are never
        # positives, and sampling them would teach the model that new items are bad ones.
        self.known_items = torch.from_numpy(np.flatnonzero(counts > 0)).to(self.device)
        share = (counts + 1.0) / (counts.sum() + dataset.num_items)
        self.log_q = torch.log(torch.from_numpy(share)).float().to(self.device)
        self.log_popularity = torch.from_numpy(np.log1p(self.popularity)).to(self.device)
        # Off: "recent" counts at the all-time rate, which makes the popular score all-time alone.
        self.recent_popularity = (recent_popularity(self.split.train, dataset.num_items, dataset.timestamps)
                                  if config.recent_popularity else self.popularity * RECENT_SHARE)
        self.neighbour_ids, self.neighbour_scores = cooccurrence_neighbours(self.split.train, dataset.num_items)
        self.next_item_ids, self.next_item_shares = next_item_shares(self.split.train, dataset.num_items)
        self.valid = Evaluation(self.split, dataset.num_items, validation=True, seed=config.seed,
                                positions=user_sample(len(self.split.users), config.validation_users, config.seed))
        # Its own seeded draw, so the test users are not only the validation sample's.
        self.test = Evaluation(self.split, dataset.num_items, validation=False, seed=config.seed,
                               positions=user_sample(len(self.split.users), config.test_users, config.seed + 1))
        # The events' weights and the users' dislikes, where the data has them (event types).
        self.events = (EventWeights(self.split, dataset.negatives, config.model.max_len, self.device)
                       if self.split.train_weights is not None or dataset.has_negatives else None)
        self.started = time.perf_counter()

    def _load_weights(self, bundle: Path) -> None:
        for name, module in (("item_encoder", self.model.items), ("query_encoder", self.model.encoder),
                             ("ranker", self.model.ranker)):
            weights = {k: torch.from_numpy(v) for k, v in load_weights(bundle, name).items()}
            module.load_state_dict(weights)

    # ---- phase 1: item + query encoder -------------------------------------------------
    @property
    def exact_softmax(self) -> bool:
        """The sample would be every known item: score them all instead."""
        return self.config.num_negatives >= len(self.known_items)

    def draw_negatives(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Negatives for a batch's (N,) target catalogue indexes: `num_negatives` uniform over
        the known items, plus the batch's distinct targets. Returns their catalogue indexes and
        the log of each one's sampling share, for the logQ correction."""
        known = self.known_items
        uniform = known[torch.randint(len(known), (self.config.num_negatives,), device=CPU).to(self.device)]
        # In-batch negatives: distinct targets of the batch, drawn in proportion to popularity,
        # hence the logQ correction; at most num_negatives of them keeps the logits small.
        others = targets.unique()
        if len(others) > self.config.num_negatives:
            others = others[torch.randperm(len(others), device=CPU)[: self.config.num_negatives].to(self.device)]
        log_q = torch.cat([torch.full((len(uniform),), math.log(self.config.num_negatives / len(known)),
                                      device=self.device),
                           self.log_q[others] + math.log(len(targets))])
        return torch.cat([uniform, others]), log_q

    def _sampled_softmax(self, users: torch.Tensor, targets: torch.Tensor, positives: torch.Tensor,
                         negatives: torch.Tensor, log_q: torch.Tensor, negative_vectors: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
        """users (N, d), targets (N,) and negatives (S,) catalogue indexes with their vectors
        (N, d) and (S, d), log_q (S,), weights (N,) or None -> (weighted) mean loss,
        accidental hits masked."""
        tau = self.config.model.temperature
        return sampled_softmax(users / tau, positives, negative_vectors, log_q, negatives[None, :] == targets[:, None],
                               weights)

    def sampled_softmax_loss(self, users: torch.Tensor, targets: torch.Tensor, items: torch.Tensor,
                             weights: torch.Tensor | None = None) -> torch.Tensor:
        """users (N, d), targets (N,) catalogue indexes, items (I, d) -> (weighted) mean loss."""
        if self.exact_softmax:
            known = self.known_items
            logits = torch.full((len(users), items.shape[0]), -math.inf, device=users.device)
            logits[:, known] = users @ items[known].T / self.config.model.temperature
            if weights is None:
                return F.cross_entropy(logits, targets)
            return (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()
        negatives, log_q = self.draw_negatives(targets)
        return self._sampled_softmax(users, targets, items[targets], negatives, log_q, items[negatives], weights)

    def encoder_loss(self, inputs: torch.Tensor, targets: torch.Tensor,
                     numbers: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder phase's loss on (B, T) windows of padded item indexes (targets are the
        inputs shifted by one). Item vectors are computed only for the items the step reads:
        its histories, its targets and its sampled negatives, so a step's cost follows the
        batch and the sample, not the catalogue. Only the exact softmax reads every item.

        `numbers`: the windows' numbers, where the data has event weights or dislikes: each
        target then counts by its event's weight, and is also ranked against the items its
        user disliked (`disliked_loss`, weighted by `negative_feedback_weight`)."""
        cfg = self.config
        valid = (targets != 0) & (inputs != 0)
        wanted = targets[valid] - 1                                              # (N,) catalogue indexes
        with_content = cfg.content_loss_weight > 0 and cfg.use_text
        events = self.events
        weights = disliked = None
        if events is not None and numbers is not None and events.weighted:
            weights = events.position_weights(numbers)[:, 1:][valid]
        if events is not None and numbers is not None and events.with_negatives and cfg.negative_feedback_weight > 0:
            disliked = events.user_negatives(numbers)[:, None, :].expand(*inputs.shape, -1)[valid]   # (N, M)
            disliked = disliked.masked_fill(disliked == wanted[:, None], -1)
        if self.exact_softmax:
            table = self.item_table()
            users = self.model.encoder(table[inputs], inputs == 0)[valid]        # (N, d)
            loss = self.sampled_softmax_loss(users, wanted, table[1:], weights)
            if with_content:
                loss = loss + cfg.content_loss_weight * self.sampled_softmax_loss(
                    users, wanted, self.model.items.content_only(), weights)
            if disliked is not None:
                loss = loss + cfg.negative_feedback_weight * disliked_loss(
                    users / cfg.model.temperature, table[wanted + 1], table[disliked + 1], disliked >= 0, weights)
            return loss
        draws = [self.draw_negatives(wanted) for _ in range(2 if with_content else 1)]
        # Every item the step reads, once, as a padded index; `rows` maps each read to its vector.
        # A disliked slot's -1 reads the padding row, masked out of its softmax.
        reads = [inputs.reshape(-1), wanted + 1, *(negatives + 1 for negatives, _ in draws)]
        if disliked is not None:
            reads.append(disliked.reshape(-1) + 1)
        touched, rows = torch.unique(torch.cat(reads), return_inverse=True)
        history_rows, target_rows, *negative_rows = rows.split([len(r) for r in reads])
        vectors = self.model.items(touched)                                       # (U, d)
        users = self.model.encoder(vectors[history_rows].view(*inputs.shape, -1), inputs == 0)[valid]
        (negatives, log_q), *content_draw = draws
        loss = self._sampled_softmax(users, wanted, vectors[target_rows], negatives, log_q,
                                     vectors[negative_rows[0]], weights)
        if with_content:
            content = self.model.items.content_of(touched)                        # (U, d)
            (negatives, log_q), = content_draw
            loss = loss + cfg.content_loss_weight * self._sampled_softmax(
                users, wanted, content[target_rows], negatives, log_q, content[negative_rows[1]], weights)
        if disliked is not None:
            loss = loss + cfg.negative_feedback_weight * disliked_loss(
                users / cfg.model.temperature, vectors[target_rows], vectors[negative_rows[-1]].view(
                    *disliked.shape, -1), disliked >= 0, weights)
        return loss

    def item_table(self) -> torch.Tensor:
        """(I + 1, d) item vectors with the padding row, as the encoder reads them."""
        return torch.cat([torch.zeros(1, self.config.model.dim, device=self.device), self.model.items.all_items()])

    def scorer(self) -> FunnelScorer:
        """The current models with frozen item tables, in evaluation mode."""
        self.model.eval()
        with torch.no_grad():
            table = self.item_table()
        popular = popular_scores(self.popularity, self.recent_popularity, RECENT_SHARE)
        # The scorer computes where the item table lives, this trainer's device.
        return FunnelScorer(self.model.encoder, self.model.ranker, table, self.text_vectors, self.log_popularity,
                            torch.from_numpy(popular), torch.from_numpy(self.neighbour_ids.astype(np.int64)),
                            torch.from_numpy(self.neighbour_scores),
                            NextItems(self.next_item_ids, self.next_item_shares, self.device), self.budgets)

    def evaluate(self, validation: bool, with_ranker: bool, when: str = "") -> dict[str, float]:
        """Full-ranking metrics of recall alone (two-tower) or of the whole funnel; its
        progress is the phase "validation of recall after encoder epoch 3" and the like."""
        scorer = self.scorer()
        cases = self.valid if validation else self.test
        name = " ".join(filter(None, ["validation" if validation else "test",
                                      "of the funnel" if with_ranker else "of recall", when]))
        return cases.full(scorer.funnel_scores if with_ranker else scorer.recall_scores,
                          lambda done, total: self.phase_progress(name, done, total))

    def _point(self, stage: str, epoch: int, loss: float, with_ranker: bool) -> dict[str, float]:
        valid = self.evaluate(True, with_ranker, f"after {stage} epoch {epoch}")
        point = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - self.started, **valid}
        if self.config.track_test:
            point["test_ndcg@10"] = self.evaluate(False, with_ranker, f"after {stage} epoch {epoch}")["ndcg@10"]
        self.progress(stage, point)
        return {"stage": 0.0 if stage == "encoder" else 1.0, **point}

    def _share(self, order: Any) -> Any:
        """This replica's part of an epoch's order: every world-th entry from its rank on,
        cut to equal lengths so that every replica takes the same number of steps."""
        if self.parallel is None:
            return order
        world = self.parallel.world
        return order[: len(order) // world * world][self.parallel.rank :: world]

    def _batch_size(self) -> int:
        """Per replica, so that one step over all replicas covers `batch_size` examples."""
        return max(1, self.config.batch_size // (self.parallel.world if self.parallel else 1))

    def _step(self, parameters: list[torch.nn.Parameter], optimiser: torch.optim.Optimizer) -> None:
        if self.parallel is not None:
            self.parallel.average_gradients(parameters)
        optimiser.step()

    def _random_streams(self) -> dict[str, torch.Tensor]:
        """The random streams a checkpoint keeps: the CPU's, and the CUDA device's (dropout
        and ID dropout draw there when the models compute on it)."""
        streams = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            streams["cuda"] = torch.cuda.get_rng_state(self.device)
        return streams

    def _restore_random_streams(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _end_of_epoch(self, state: PhaseState, optimiser: torch.optim.Optimizer, stop: bool) -> bool:
        """Checkpoint and report (data-parallel runs), and the stop decision all replicas share."""
        if self.parallel is None:
            return stop
        self.parallel.epoch_done(self, state, optimiser)
        return self.parallel.any(stop)

    def _encoder_batches(self, windows: torch.Tensor, generator: torch.Generator, epoch: int,
                         batch_size: int) -> Iterator[torch.Tensor | None]:
        """One epoch of this replica's training windows, batch by batch, each row led by its
        window's number. From a shard, the replicas go on together until every shard is done
        (one replica may have a batch more than another); a replica whose shard is done
        meanwhile gets None."""
        if self.shard is None:
            order = self._share(torch.randperm(len(windows), generator=generator, device=CPU))
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                yield torch.cat([chosen[:, None], windows[chosen]], 1)
            return
        assert self.parallel is not None
        own = self.shard.numbered(epoch, batch_size)
        while True:
            batch = next(own, None)
            if not self.parallel.any(batch is not None):
                return
            yield batch

    def encoder_optimiser(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW whose sparse ID-table rows update only when a step touches them."""
        return LazyAdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def train_encoder(self) -> list[dict[str, float]]:
        cfg = self.config
        if self.resume is not None and self.resume.phase == "ranker":  # done before the checkpoint
            return [p for p in self.resume.curve if p["stage"] == 0.0]
        # Each phase draws from its own seeded stream, so its result does not depend on how
        # many random numbers another model's initialisation used.
        seed_everything(cfg.seed)
        windows = (torch.zeros((0, cfg.model.max_len + 1), dtype=torch.int64) if self.shard is not None
                   else torch.from_numpy(training_windows(self.split.train, cfg.model.max_len)))
        params = list(self.model.items.parameters()) + list(self.model.encoder.parameters())
        optimiser = self.encoder_optimiser(params)
        generator = torch.Generator().manual_seed(cfg.seed)
        state = PhaseState("encoder")
        if self.warm_start is not None:  # the starting weights are the ones to beat
            state = PhaseState("encoder", best=self.evaluate(True, False, "before training")["ndcg@10"],
                               best_state={k: v.detach().clone() for k, v in self.model.state_dict().items()})
        if self.resume is not None:
            state = self.resume
            optimiser.load_state_dict(state.optimiser or {})
            generator.set_state(state.rng["generator"])
            self._restore_random_streams(state.rng)
        batch_size = self._batch_size()
        for epoch in range(state.epoch, cfg.epochs):
            self.model.train()
            total = 0.0
            steps = -(-(self.shard.rows if self.shard else len(self._share(windows))) // batch_size)
            for step, batch in enumerate(self._encoder_batches(windows, generator, epoch, batch_size), 1):
                optimiser.zero_grad()
                if batch is not None:
                    numbers, batch = batch[:, 0], batch[:, 1:].to(self.device)
                    loss = self.encoder_loss(batch[:, :-1], batch[:, 1:], numbers)
                    loss.backward()
                    total += loss.item()
                self._step(params, optimiser)  # a replica with no batch left adds zeros to the average
                self.phase_progress(f"encoder epoch {epoch + 1}", min(step, steps), steps)
            point = self._point("encoder", epoch + 1, total, with_ranker=False)
            state.curve.append(point)
            state.epoch = epoch + 1
            if point["ndcg@10"] > state.best:
                state.best, state.stale = point["ndcg@10"], 0
                state.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                state.stale += 1
            state.rng = {"generator": generator.get_state(), **self._random_streams()}
            if self._end_of_epoch(state, optimiser, state.stale >= cfg.patience
                                  or point["seconds"] > cfg.time_budget_s):
                break
        if state.best_state is not None:
            self.model.load_state_dict(state.best_state)
        self.encoder_curve = list(state.curve)
        phase_curve = [p for p in state.curve if p["stage"] == 0.0]
        self.stops["encoder"] = stop_report("encoder", phase_curve, cfg.time_budget_s,
                                            phase_curve[-1]["seconds"] if phase_curve else 0.0, state.epoch,
                                            cfg.epochs, state.stale >= cfg.patience)
        return state.curve

    # ---- phase 2: ranker ------------------------------------------------------------------
    def ranker_examples(self) -> list[tuple[np.ndarray, int, float]]:
        """(history, target, weight) from the most recent training positions of every user:
        the target's event weight (type × value × inverse propensity, 1 without weights), so
        that the ranker learns from each event as much as the encoders do."""
        weights = self.split.train_weights
        examples = []
        for user, seq in enumerate(self.split.train):
            for end in range(max(1, len(seq) - self.config.ranker_positions), len(seq)):
                examples.append((seq[:end], int(seq[end]), 1.0 if weights is None else float(weights[user][end])))
        return examples

    def train_ranker(self) -> list[dict[str, float]]:
        cfg = self.config
        seed_everything(cfg.seed + 1)
        examples = self.ranker_examples()
        params = list(self.model.ranker.parameters())
        optimiser = torch.optim.AdamW(params, lr=cfg.lr)
        rng = np.random.default_rng(cfg.seed)
        earlier = list(self.encoder_curve)
        if self.resume is not None and self.resume.phase == "ranker":
            state = self.resume
            optimiser.load_state_dict(state.optimiser or {})
            rng.bit_generator.state = state.rng["numpy"]
            self._restore_random_streams(state.rng)
        else:
            start = self.evaluate(True, True, "before ranker training")["ndcg@10"]
            state = PhaseState("ranker", best=start, start=start,
                               best_state={k: v.clone() for k, v in self.model.ranker.state_dict().items()},
                               curve=earlier)
        scorer = self.scorer()  # item tables are fixed from here on
        with torch.no_grad():
            scorer.cold_table = self.model.items.content_only()
        batch_size = self._batch_size()
        phase_started = time.perf_counter()
        for epoch in range(state.epoch, cfg.ranker_epochs):
            order = self._share(rng.permutation(len(examples))[: cfg.ranker_examples_per_epoch])
            total = 0.0
            steps = -(-len(order) // batch_size)
            for step, start in enumerate(range(0, len(order), batch_size), 1):
                self.phase_progress(f"ranker epoch {epoch + 1}", step, steps)
                chosen = [examples[i] for i in order[start : start + batch_size]]
                histories = [h for h, _, _ in chosen]
                targets = torch.tensor([t for _, t, _ in chosen], device=self.device)
                target_weights = torch.tensor([w for _, _, w in chosen], dtype=torch.float32, device=self.device)
                with torch.no_grad():
                    users, semantic = scorer.queries(histories)
                    candidates, flags, mask = scorer.recall(histories, users, semantic,
                                                            SeenItems(histories, self.device))
                hit = (candidates == targets[:, None]) & mask
                keep = hit.any(1)  # learn only where recall found the target
                optimiser.zero_grad()
                if not keep.any():
                    if self.parallel is None:
                        continue
                    # Replicas step together: this one adds nothing to the average.
                    for p in params:
                        p.grad = torch.zeros_like(p)
                    self._step(params, optimiser)
                    continue
                self.model.ranker.train()
                as_cold = (torch.rand(candidates.shape, device=CPU) < cfg.ranker_cold_share).to(self.device)
                scores = scorer.rank(histories, users, semantic, candidates, flags, as_cold)
                scores = scores.masked_fill(~mask, -math.inf)
                losses = F.cross_entropy(scores[keep], hit[keep].float().argmax(1), reduction="none")
                loss = (losses * target_weights[keep]).sum() / target_weights[keep].sum()
                loss.backward()
                self._step(params, optimiser)
                total += loss.item()
            point = self._point("ranker", epoch + 1, total, with_ranker=True)
            state.curve.append(point)
            state.epoch = epoch + 1
            # The score to beat starts as the funnel's before ranker training: the phase goes on
            # until it beats that, and then its own best, or `ranker_patience` epochs pass without.
            if point["ndcg@10"] > state.best:
                state.best, state.stale = point["ndcg@10"], 0
                state.best_state = {k: v.clone() for k, v in self.model.ranker.state_dict().items()}
            else:
                state.stale += 1
            state.rng = {"numpy": rng.bit_generator.state, **self._random_streams()}
            if self._end_of_epoch(state, optimiser, state.stale >= cfg.ranker_patience
                                  or time.perf_counter() - phase_started > cfg.ranker_time_budget_s):
                break
        ranker_curve = [p for p in state.curve if p["stage"] == 1.0]
        self.stops["ranker"] = stop_report("ranker", ranker_curve, cfg.ranker_time_budget_s,
                                           time.perf_counter() - phase_started, state.epoch, cfg.ranker_epochs,
                                           state.stale >= cfg.ranker_patience)
        # Whether the trained ranker beat the funnel it started from (else the start is kept).
        self.stops["ranker"]["beat_start"] = state.best > state.start
        if state.best_state is not None:
            self.model.ranker.load_state_dict(state.best_state)
        return [p for p in state.curve if p["stage"] == 1.0]

    # ---- export -----------------------------------------------------------------------------
    def index_reports(self, arrays: dict[str, np.ndarray], queries: dict[str, np.ndarray]
                      ) -> dict[str, dict[str, Any]]:
        """What the default recall index of each channel would be over the whole catalogue, with
        its recall@100 against exact search on real queries, as recall shards build it."""
        reports = {}
        for done, (channel, vectors) in enumerate(arrays.items()):
            self.phase_progress("index build", done, len(arrays))
            _, report = build_index(vectors, np.arange(len(vectors)), use_gpu=False, queries=queries[channel])
            reports[channel] = report.to_dict()
        self.phase_progress("index build", len(arrays), len(arrays))
        return reports

    def export(self, folder: Path, metrics: dict[str, Any]) -> Bundle:
        with torch.no_grad():
            self.model.eval()
            table = self.item_table()
        state = self.model.state_dict()
        arrays = {SEQUENTIAL: table[1:].cpu().numpy().astype(np.float32), SEMANTIC: self.text_vectors}
        # Real query vectors travel with the bundle: recall shards tune their indexes' search
        # breadth on them. Query-like mixes of items are a poor stand-in where trained user
        # vectors crowd into a few lists (nprobe 384 instead of 8 at the same recall, 10^6 items).
        queries = _index_queries(self)
        # What users who share an attribute took: serves users whose only history is their attributes.
        segments = SegmentCounts.build(self.split.train, self.dataset.user_properties, self.dataset.num_items)
        bundle = Bundle(
            version=new_version_id(self.dataset.name),
            item_ids=self.dataset.item_ids,
            item_texts=self.dataset.item_texts,
            item_attributes=self.dataset.item_attributes(),
            arrays={**arrays, "popularity": self.popularity, "recent_popularity": self.recent_popularity,
                    "item2item_ids": self.neighbour_ids, "item2item_scores": self.neighbour_scores,
                    "next_item_ids": self.next_item_ids, "next_item_shares": self.next_item_shares,
                    "segment_counts": segments.counts,
                    **{tuning_queries_name(channel): q for channel, q in queries.items()}},
            manifest={
                "dataset": self.dataset.name,
                "model": self.config.model.to_dict(),
                "training": {k: v for k, v in self.config.to_dict().items() if k != "model"},
                "text_model": self.text_model,
                "tag_vocabulary": self.tag_vocabulary,
                # The precomputed vectors the item encoder fuses, name -> size: what UpsertItems takes.
                "item_vectors": {name: int(v.shape[1]) for name, v in self.item_vectors.items()},
                "candidates_per_channel": self.budgets,
                "recent_share": RECENT_SHARE,
                "segments": {"rule": segments.rule.to_json(), "names": segments.names},
                "metrics": metrics,
                "indexes": self.index_reports(arrays, queries),
                "created_unix": time.time(),
            },
        )
        weights = {
            name: {k.removeprefix(f"{prefix}."): v.cpu().numpy() for k, v in state.items()
                   if k.startswith(f"{prefix}.")}
            for name, prefix in (("query_encoder", "encoder"), ("ranker", "ranker"), ("item_encoder", "items"))
        }
        self.phase_progress("bundle write", 0, 1)
        bundle.save(folder, weights)
        self.phase_progress("bundle write", 1, 1)
        return bundle


def _index_queries(trainer: Trainer, count: int = 256) -> dict[str, np.ndarray]:
    """Real queries per vector channel: the trained encoders' vectors of validation histories."""
    histories = [trainer.split.valid_history(p) for p in range(min(count, len(trainer.split.users)))]
    with torch.no_grad():
        users, semantic = trainer.scorer().queries(histories)
    return {SEQUENTIAL: users.cpu().numpy().astype(np.float32), SEMANTIC: semantic.cpu().numpy().astype(np.float32)}


def fit(trainer: Trainer) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Both training phases, then the metrics of the chosen checkpoints."""
    curve = trainer.train_encoder() + trainer.train_ranker()
    metrics = {
        "train_seconds": time.perf_counter() - trainer.started,
        "validation_users": len(trainer.valid),
        "test_users": len(trainer.test),
        "stops": trainer.stops,
        "valid": {"recall": trainer.evaluate(True, False, "for the report"),
                  "funnel": trainer.evaluate(True, True, "for the report")},
        "test": {"recall": trainer.evaluate(False, False, "for the report"),
                 "funnel": trainer.evaluate(False, True, "for the report")},
    }
    return metrics, curve


def train(dataset: Dataset, config: TrainConfig, out: Path, text_encoder: TextEncoder | None = None,
          progress: Progress | None = None, phase_progress: PhaseProgress | None = None) -> TrainResult:
    """Train every model of the funnel on `dataset` and write the bundle to `out`."""
    trainer = Trainer(dataset, config, text_encoder, progress, phase_progress=phase_progress)
    metrics, curve = fit(trainer)
    bundle = trainer.export(out, metrics)
    log.info("bundle %s written to %s", bundle.version, out)
    return TrainResult(out, bundle.version, metrics, curve)
