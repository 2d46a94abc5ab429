"""A recfunnel cluster on a fresh two-CPU local Ray, as the cluster tests run it."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from cluster.config import ClusterConfig
from cluster.demo import seed_history
from cluster.launch import RunningCluster, start_cluster
from gateway.events import EventLog
from recdata.dataset import Dataset


@contextlib.contextmanager
def local_cluster(config: ClusterConfig, history: Dataset, metrics_port: int | None = None
                  ) -> Iterator[RunningCluster]:
    """Seed the event log with `history`, start Ray and the cluster; stop both afterwards.
    `metrics_port`: where Ray serves the node's metrics in Prometheus format."""
    events = EventLog(Path(config.db_path))
    seed_history(events, history)
    events.close()
    options = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, **options)
    try:
        running = start_cluster(config)
        yield running
        running.stop()
    finally:
        ray.shutdown()


def two_nodes() -> tuple[Cluster, Any]:
    """A head and a second node, 2 CPUs each. Ray waits a fixed 30 s for a raylet to register,
    which a busy 2-core machine can miss; one more try is then made before failing."""
    for attempt in range(2):
        nodes = Cluster(initialize_head=False)
        try:
            nodes.add_node(num_cpus=2)
            return nodes, nodes.add_node(num_cpus=2)
        except Exception:  # noqa: BLE001 - "timed out during startup": start afresh once
            nodes.shutdown()
            if attempt == 1:
                raise
    raise AssertionError("unreachable")


def scrape(port: int, wanted: list[str], within_s: float = 60.0) -> dict[str, float]:
    """Sum each wanted Prometheus sample name (with any labels) from Ray's metrics endpoint,
    waiting until every one has appeared: Ray exports every few seconds."""
    deadline = time.monotonic() + within_s
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            found = {}
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in wanted:
                    found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            if set(wanted) <= set(found):
                return found
        time.sleep(1.0)
    raise AssertionError(f"metrics missing after {within_s} s: {sorted(set(wanted) - set(found))}")
