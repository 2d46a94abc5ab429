"""A recfunnel cluster on a fresh two-CPU local Ray, as the cluster tests run it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import ray

from cluster.config import ClusterConfig
from cluster.demo import seed_history
from cluster.launch import RunningCluster, start_cluster
from gateway.events import EventLog
from recdata.dataset import Dataset


@contextlib.contextmanager
def local_cluster(config: ClusterConfig, history: Dataset) -> Iterator[RunningCluster]:
    """Seed the event log with `history`, start Ray and the cluster; stop both afterwards."""
    events = EventLog(Path(config.db_path))
    seed_history(events, history)
    events.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        running = start_cluster(config)
        yield running
        running.stop()
    finally:
        ray.shutdown()
