"""Operating a long-running cluster: `recfunnel up`, `status`, `down`, `swap`, `versions`,
`rollback` and `loop`.

`up` without an address starts a local Ray head (dashboard on 127.0.0.1:8265) and runs the
controller as a detached actor, so the services outlive the command; with an address it
joins that Ray cluster. `status` and `down` find the controller by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from cluster.config import ClusterConfig
from cluster.controller import NAMESPACE
from cluster.launch import find_cluster, start_cluster
from cluster.loop import LOOP_NAME, ControllerServing, FeedbackLoop, LoopConfig
from gateway.events import open_event_store
from protos.auth import TlsFiles
from recdata.movielens import cache_dir

DASHBOARD_HOST, DASHBOARD_PORT = "127.0.0.1", 8265
DASHBOARD = f"{DASHBOARD_HOST}:{DASHBOARD_PORT}"


def _state_file() -> Path:
    """Remembers that `up` started the local Ray head, so `down` stops it again."""
    return cache_dir() / "up.json"


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def head_command() -> list[str]:
    """`ray start` for the local head: the dashboard on loopback only (an SSH tunnel or the
    operator's own proxy reaches it; it has no authentication of its own)."""
    # `--port=0`: Ray's default head port is 6379, Redis's, taken on any machine that runs one;
    # Ray picks a free port instead, and `address="auto"` finds it.
    return [_ray_cli(), "start", "--head", "--port=0", f"--dashboard-host={DASHBOARD_HOST}",
            f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats", f"--num-cpus={os.cpu_count() or 2}"]


class HeadStartFailed(RuntimeError):
    """`ray start --head` exited with an error; the message ends with what Ray printed."""


def _connect(address: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)


def up(config: ClusterConfig, address: str | None) -> dict[str, Any]:
    """Start the cluster; returns its endpoints."""
    # Actors may run in other folders (or on other nodes): give them absolute paths.
    tls = config.tls and TlsFiles(config.tls.cert.resolve(), config.tls.key.resolve())
    config = replace(config, bundle=config.bundle.resolve(), db_path=config.db_path.resolve(), tls=tls)
    started_head = False
    if address is None:
        started = subprocess.run(head_command(), capture_output=True, text=True)
        if started.returncode != 0:
            said = (started.stderr or started.stdout).strip().splitlines()[-6:]
            raise HeadStartFailed(f"`{' '.join(head_command()[1:])}` failed (exit {started.returncode}):\n"
                                  + "\n".join(said))
        started_head, address = True, "auto"
    _connect(address)
    try:
        config = config.with_gpus(ray.cluster_resources().get("GPU", 0.0))
        running = start_cluster(config, detached=True)
        endpoints = running.status()
    finally:
        ray.shutdown()
    _state_file().write_text(json.dumps({"address": address, "started_head": started_head}), "utf-8")
    return {**endpoints, "dashboard": f"http://{DASHBOARD}" if started_head else ""}


def _address(address: str | None) -> str:
    if address:
        return address
    state = _state_file()
    return json.loads(state.read_text("utf-8"))["address"] if state.exists() else "auto"


def status(address: str | None = None) -> dict[str, Any]:
    """Each service actor: address, node, state, model version and restarts."""
    _connect(_address(address))
    try:
        return find_cluster().status()
    finally:
        ray.shutdown()


def down(address: str | None = None) -> None:
    """Stop every service, and the local Ray head if `up` started it."""
    state = _state_file()
    started_head = state.exists() and json.loads(state.read_text("utf-8")).get("started_head", False)
    _connect(_address(address))
    try:
        find_cluster().stop()
    finally:
        ray.shutdown()
        if started_head:
            subprocess.run([_ray_cli(), "stop"], check=False, capture_output=True)
        state.unlink(missing_ok=True)


def _ask_controller(address: str | None, method: str, *args: Any) -> Any:
    _connect(_address(address))
    try:
        controller = find_cluster().controller
        return ray.get(getattr(controller, method).remote(*args), timeout=600)
    finally:
        ray.shutdown()


def swap(bundle: Path, address: str | None = None) -> dict[str, Any]:
    """Serve another bundle: loaded beside the serving one on every service, then switched."""
    report: dict[str, Any] = _ask_controller(address, "swap", str(bundle.resolve()))
    return report


def versions(address: str | None = None) -> list[dict[str, Any]]:
    """Every version the cluster has served, with its metrics; `serving` marks the current one."""
    listed: list[dict[str, Any]] = _ask_controller(address, "versions")
    return listed


def feedback_loop(config: LoopConfig, address: str | None = None, once: bool = False,
                  say: Callable[[dict[str, Any]], None] = print) -> None:
    """`recfunnel loop`: rounds of the feedback loop against the running cluster, from this
    process; with `once`, one round now. A cluster whose config runs the loop actor is asked
    for its round instead: two loops over one event log would judge the same events twice."""
    _connect(_address(address))
    try:
        try:
            actor = ray.get_actor(LOOP_NAME, namespace=NAMESPACE)
        except ValueError:
            actor = None
        if actor is not None:
            if not once:
                raise ValueError("this cluster runs its feedback loop actor already (see `recfunnel status`); "
                                 "`recfunnel loop --once` asks it for a round now")
            round_ref: Any = actor.run_round.remote()
            report: dict[str, Any] = ray.get(round_ref, timeout=3600)
            say(report)
            return
        running = find_cluster()
        store = ray.get(running.controller.endpoints.remote(), timeout=30)["db"]  # the cluster's own
        loop = FeedbackLoop(config, open_event_store(store), ControllerServing(running.controller), on_round=say)
        if once:
            loop.run_round()
        else:
            loop.run(threading.Event())  # until interrupted
    finally:
        ray.shutdown()


def rollback(version: str, address: str | None = None) -> dict[str, Any]:
    """Serve an earlier version again (a live swap, no failed requests)."""
    try:
        report: dict[str, Any] = _ask_controller(address, "rollback", version)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if isinstance(error.cause, ValueError) else None
        if cause is not None:
            raise cause from None
        raise
    return report
