"""Position bias: how much more often an item is clicked for being shown higher up.

A click on the answer's third item says less about the item than a click on its first,
because people look at the first more. Learning from logged clicks as they are teaches a
model to repeat what it already ranked high. Two parts undo that:

  * exploration (the gateway, `ExplorationConfig`): a small share of Recommend answers swaps
    one adjacent pair of places, drawn at random in the first `depth`; the exposure log keeps
    both the shown place and the ranked one;
  * estimation (here): for places k and k+1 the swapped answers show the same items as the
    unswapped ones, one place off. With p the propensity of a place and r the appeal of what
    the ranking puts there, an unswapped answer's CTR at k is p_k r_k and a swapped one's at
    k+1 is p_(k+1) r_k; likewise p_(k+1) r_(k+1) and p_k r_(k+1) for the other item. So

        p_(k+1) / p_k = sqrt( CTR(k+1, swapped down) / CTR(k, unswapped)
                              × CTR(k+1, unswapped) / CTR(k, swapped up) )

    with the appeals cancelled, and the chain from p_0 = 1 gives every place's propensity
    (the swap estimator of Joachims et al., 2017, on adjacent pairs as in Wang et al., 2018).

The feedback loop's fine-tuning then weighs each attributed click by 1 / propensity of the
place it was shown at (clipped at `clip`, so that a rarely seen place cannot dominate, and
self-normalised, so that the clicks weigh as much in all as they did). Cost: the estimate is
one grouped pass over the exposures of the first `depth` places, its result `depth` numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 100


@dataclass(frozen=True)
class ExplorationConfig:
    """`[exploration]` of the cluster config. Off by default: a swapped answer is a little
    worse for its user, the price of an unbiased estimate."""

    swap_share: float = 0.0  # of Recommend answers that swap one adjacent pair; 0 = off
    depth: int = 10          # the pair is drawn among the first `depth` places

    def __post_init__(self) -> None:
        if not (math.isfinite(self.swap_share) and 0 <= self.swap_share <= 1):
            raise ValueError(f"exploration swap_share={self.swap_share} must be in 0.0..1.0")
        if not 2 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"exploration depth={self.depth} must be in 2..{MAX_DEPTH}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExplorationConfig:
        unknown = set(values) - {"swap_share", "depth"}
        if unknown:
            raise ValueError(f"[exploration] has unknown settings {sorted(unknown)}; allowed: depth, swap_share")
        return cls(float(values.get("swap_share", 0.0)), int(values.get("depth", 10)))


class Explorer:
    """Which answers swap which pair. Each answer draws on its own, so a user sees a swap in
    about `swap_share` of their answers, never the same pattern twice on purpose."""

    def __init__(self, config: ExplorationConfig, rng: random.Random | None = None):
        self.config = config
        self.rng = rng or random.Random()
        self.swapped = 0  # answers explored so far

    def pair_to_swap(self, answer_length: int) -> int | None:
        """k: swap places k and k+1 of this answer; None: show it as ranked."""
        places = min(answer_length, self.config.depth)
        if places < 2 or self.config.swap_share <= 0 or self.rng.random() >= self.config.swap_share:
            return None
        self.swapped += 1
        return self.rng.randrange(places - 1)


def ranked_positions(answer_length: int, swapped: int | None) -> list[int]:
    """For each shown place, the place the ranking gave its item."""
    order = list(range(answer_length))
    if swapped is not None:
        order[swapped], order[swapped + 1] = order[swapped + 1], order[swapped]
    return order


@dataclass(frozen=True)
class PositionPropensity:
    """Each place's click propensity relative to the first, as far as the log supports it."""

    propensity: tuple[float, ...]    # [1.0, p_1, ...]: stops at the first pair without data
    pairs: tuple[dict[str, Any], ...]  # per adjacent pair: its ratio and the exposures behind it
    depth: int

    def at(self, position: int) -> float:
        """The propensity of a place; beyond the estimate, the last estimated one (people look
        no more at a lower place than at a higher one)."""
        return self.propensity[min(position, len(self.propensity) - 1)]

    def inverse(self, position: int, clip: float) -> float:
        return 1.0 / max(self.at(position), clip)

    def to_json(self) -> dict[str, Any]:
        return {"depth": self.depth, "propensity": [round(p, 4) for p in self.propensity],
                "pairs": list(self.pairs)}


def estimate_propensity(outcomes: Iterable[tuple[int, int, int, int]], depth: int,
                        min_swapped: int = 20) -> PositionPropensity:
    """From (shown place, ranked place, exposures, clicks) counts (`EventStore.position_outcomes`).
    A pair needs `min_swapped` swapped exposures each way and a click in all four cells."""
    cells: dict[tuple[int, int], tuple[int, int]] = {}
    for shown, ranked, exposures, clicks in outcomes:
        seen, clicked = cells.get((shown, ranked), (0, 0))
        cells[(shown, ranked)] = (seen + exposures, clicked + clicks)

    def ctr(shown: int, ranked: int) -> tuple[float, int]:
        seen, clicked = cells.get((shown, ranked), (0, 0))
        return (clicked / seen if seen else 0.0), seen

    propensity = [1.0]
    pairs: list[dict[str, Any]] = []
    for k in range(depth - 1):
        (stay_k, n_k), (stay_next, n_next) = ctr(k, k), ctr(k + 1, k + 1)
        (down, n_down), (up, n_up) = ctr(k + 1, k), ctr(k, k + 1)
        enough = min(n_down, n_up) >= min_swapped and min(stay_k, stay_next, down, up) > 0
        ratio = math.sqrt(down / stay_k * stay_next / up) if enough else None
        pairs.append({"places": [k, k + 1], "ratio": None if ratio is None else round(ratio, 4),
                      "swapped_exposures": n_down + n_up, "unswapped_exposures": n_k + n_next})
        if ratio is None:
            break
        propensity.append(propensity[-1] * ratio)
    return PositionPropensity(tuple(propensity), tuple(pairs), depth)


def inverse_propensity_factors(shown_at: dict[int, int], estimate: PositionPropensity,
                               clip: float) -> tuple[dict[int, float], dict[str, Any]]:
    """seq -> its event's weight factor: 1 / propensity of the place it was clicked at,
    clipped at `clip`, scaled so that the factors average 1 (self-normalised)."""
    if not 0 < clip <= 1:
        raise ValueError(f"propensity clip={clip} must be in (0, 1]")
    raw = {seq: estimate.inverse(place, clip) for seq, place in shown_at.items()}
    if not raw:
        return {}, {"events": 0}
    mean = sum(raw.values()) / len(raw)
    clipped = sum(1 for place in shown_at.values() if estimate.at(place) < clip)
    factors = {seq: factor / mean for seq, factor in raw.items()}
    return factors, {"events": len(raw), "clipped": clipped, "raw_mean": round(mean, 4),
                     "max_factor": round(max(factors.values()), 4)}
