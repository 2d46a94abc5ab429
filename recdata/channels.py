"""Names of the recall channels, shared by recall, ranking and the gateway."""

from __future__ import annotations

SEQUENTIAL = "sequential"  # query-encoder user vector vs item vectors (two-tower)
SEMANTIC = "semantic"      # recency-weighted LM text vector of the history vs item text vectors
POPULAR = "popular"        # most interacted items; answers users without history

VECTOR_CHANNELS = (SEQUENTIAL, SEMANTIC)
CHANNELS = (SEQUENTIAL, SEMANTIC, POPULAR)
