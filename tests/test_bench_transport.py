"""The transport probe: an idle and a back-to-back round trip, over grpc.aio and over a bare
asyncio socket."""

from __future__ import annotations

import pytest

from bench.transport import run_transport_bench


def test_the_transport_probe_times_both_round_trips() -> None:
    report = run_transport_bench(rate=40.0, seconds=0.5)

    for probe in ("asyncio_tcp", "grpc_aio"):
        figures = report[probe]
        assert figures["idle_calls"] > 0
        assert 0 < figures["back_to_back_p50_ms"] < 1000 and 0 < figures["idle_p50_ms"] < 1000
        assert figures["idle_extra_ms"] == pytest.approx(figures["idle_p50_ms"] - figures["back_to_back_p50_ms"],
                                                         abs=2e-3)  # each figure rounded on its own
    assert set(report["machine"]) == {"cpuidle_driver", "guest_halt_poll_ns"}


@pytest.mark.parametrize(("rate", "seconds"), [(0.0, 1.0), (101.0, 1.0), (10.0, 0.0)])
def test_the_transport_probe_refuses_rates_and_durations_out_of_range(rate: float, seconds: float) -> None:
    with pytest.raises(ValueError, match="must be in"):
        run_transport_bench(rate=rate, seconds=seconds)
