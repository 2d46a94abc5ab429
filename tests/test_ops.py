"""`recfunnel up` starts its own Ray head on a machine whose Redis holds Ray's default port."""

from __future__ import annotations

import contextlib
import socket
import subprocess

import pytest

from cluster.ops import _ray_cli, head_command

RAY_DEFAULT_PORT = 6379


@pytest.mark.fault
def test_the_local_head_starts_while_another_server_holds_port_6379() -> None:
    holder = socket.socket()
    with contextlib.suppress(OSError):  # already taken (a Redis server): the case itself
        holder.bind(("0.0.0.0", RAY_DEFAULT_PORT))
        holder.listen()
    try:
        started = subprocess.run(head_command(), capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-2000:]
    finally:
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120)
        holder.close()
