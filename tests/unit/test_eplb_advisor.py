"""The EPLB advisor (eplb.mode: auto) on load traces, without Ray: it recommends only on a
sustained imbalance, never flaps, and sizes the redundant experts so that EP divides them."""

from __future__ import annotations

import itertools

import pytest

from moe_operator import eplb_advisor, live, status
from moe_operator.api import MoEDeploymentSpec, MoEDeploymentStatus
from moe_operator.eplb_advisor import HYSTERESIS, Settings, Tracker, observe, redundant_for
from moe_operator.planner import plan

S = Settings(
    threshold=1.3, sustain_s=600, min_interval_s=3600, num_experts=128, ep=8, eplb_enabled=False
)


def run(trace: list[tuple[float, float | None]], s: Settings = S) -> list[bool]:
    """The recommendation after each (time, imbalance) reading of a trace."""
    tracker = Tracker()
    out = []
    for t, value in trace:
        advice = observe(tracker, s, t, value)
        assert advice is not None
        out.append(advice.recommend)
    return out


def every(step: float, until: float, value: float | None, start: float = 0.0) -> list:
    n = int((until - start) / step)
    return [(start + i * step, value) for i in range(n + 1)]


def test_sustained_imbalance_is_recommended_after_the_window_only() -> None:
    trace = every(30, 900, 1.6)
    got = run(trace)
    first = got.index(True)
    assert trace[first][0] == 600  # sustainSeconds after the run began
    assert all(got[first:])


def test_a_spike_shorter_than_the_window_is_not() -> None:
    trace = every(30, 300, 1.05) + every(30, 800, 2.5, start=330) + every(30, 2000, 1.05, 830)
    assert not any(run(trace))


def test_a_value_hovering_at_the_threshold_never_flaps() -> None:
    # Recorded-like trace: imbalanced for 15 min, then oscillating in the hysteresis band
    # (between threshold - HYSTERESIS and threshold) and just across the threshold.
    trace = every(30, 900, 1.5)
    t = 930.0
    for i in range(200):
        trace.append((t, 1.31 if i % 2 else 1.25))
        t += 30
    got = run(trace)
    changes = sum(1 for a, b in itertools.pairwise(got) if a != b)
    assert changes == 1  # on once, never off: 1.25 is inside the band, the runs never sustain


def test_it_stops_after_a_sustained_calm_but_not_within_the_min_interval() -> None:
    trace = every(60, 900, 1.8)  # on at 600
    trace += every(60, 8000, 1.0, start=960)  # calm from 960
    got = run(trace)
    on_at = trace[got.index(True)][0]
    off_at = trace[len(got) - got[::-1].index(True)][0]
    assert on_at == 600
    # Calm was sustained by 960 + 600 = 1560, but the last change was at 600: not before 4200.
    assert off_at == on_at + S.min_interval_s


def test_no_reading_breaks_the_run() -> None:
    trace = [*every(30, 500, 1.9), (530.0, None), *every(30, 1200, 1.9, start=560)]
    got = run(trace)
    assert trace[got.index(True)][0] == 560 + 600


def test_nothing_to_advise_without_ep_or_with_eplb_on() -> None:
    assert observe(Tracker(), Settings(1.3, 0, 0, 128, 1, False), 0.0, 3.0) is None
    assert observe(Tracker(), Settings(1.3, 0, 0, 128, 8, True), 0.0, 3.0) is None


@pytest.mark.parametrize(
    ("imbalance", "experts", "ep", "want"),
    [
        (1.0, 128, 8, 0),
        (1.25, 128, 8, 8),  # 0.25 x 16 per rank = 4, raised to 8 so 136 divides by 8
        (1.5, 256, 32, 32),  # 0.5 x 8 = 4 -> 32 (288 = 9 x 32)
        (2.0, 8, 2, 4),  # 1.0 x 4 = 4 -> 4 (12 = 6 x 2)
        (1.01, 60, 4, 4),  # at least one copy: 1 -> 4 (64 = 16 x 4)
    ],
)
def test_redundant_experts_follow_the_load_and_divide_by_ep(
    imbalance: float, experts: int, ep: int, want: int
) -> None:
    n = redundant_for(imbalance, experts, ep)
    assert n == want
    assert (experts + n) % ep == 0


def test_condition_and_message_say_what_to_set() -> None:
    tracker = Tracker()
    advice = None
    for t, v in every(60, 700, 1.5):
        advice = observe(tracker, S, t, v)
    assert advice is not None and advice.recommend
    assert "redundantExperts: 8" in advice.message  # 0.5 x 16 = 8; 136 = 17 x 8
    base = live.LiveStatus(0.0, 1, 1, None, None, eplb_advice=advice)
    inputs = status.Inputs(
        name="d",
        generation=1,
        now="2026-12-05T00:00:00Z",
        ray_service={"metadata": {"generation": 1}, "status": {}},
        live=base,
        eplb_auto=True,
    )
    conds = {c["type"]: c for c in status.compute(inputs)["conditions"]}
    cond = conds[status.EPLB_CONDITION]
    assert cond["status"] == "True" and cond["reason"] == "ExpertImbalance"
    assert "spec.parallelism.eplb.enabled: true" in cond["message"]
    # Not configured: no such condition.
    plain = status.compute(
        status.Inputs(name="d", generation=1, now="2026-12-05T00:00:00Z", live=base)
    )
    assert status.EPLB_CONDITION not in {c["type"] for c in plain["conditions"]}
    assert HYSTERESIS > 0


# ---- apply: the operator turns EPLB on itself (eplb.apply) ---------------------------------


def _spec(**eplb: object) -> MoEDeploymentSpec:
    return MoEDeploymentSpec.model_validate(
        {
            "model": {"name": "m", "source": "hf://Qwen/Qwen3-30B-A3B"},
            "resources": {"accelerator": "A100-80GB", "gpusPerNode": 8},
            "parallelism": {"tensorParallelSize": 8, "eplb": eplb},
        }
    )


def test_apply_is_recorded_in_status_and_the_effective_spec_plans_with_it() -> None:
    written = _spec(mode="auto", apply=True)
    assert eplb_advisor.applies(written)
    assert not eplb_advisor.applies(_spec(mode="auto"))  # recommend only
    assert not eplb_advisor.applies(_spec(mode="auto", apply=True, enabled=True))  # already on
    tracker = Tracker()
    s = Settings(
        threshold=1.3, sustain_s=600, min_interval_s=3600, num_experts=128, ep=8,
        eplb_enabled=False,
    )  # fmt: skip
    advice = None
    for t, v in every(60, 700, 1.5):
        advice = observe(tracker, s, t, v)
    record = eplb_advisor.record(advice, 1.5, "2026-12-05T00:00:00Z")
    assert record == {"redundantExperts": 8, "imbalance": 1.5, "time": "2026-12-05T00:00:00Z"}
    assert eplb_advisor.record(None, 1.5, "t") is None
    calm = observe(Tracker(), s, 0.0, 1.0)
    assert eplb_advisor.record(calm, 1.0, "t") is None

    effective = eplb_advisor.effective(written, record)
    assert effective.parallelism.eplb.enabled and effective.parallelism.eplb.redundant_experts == 8
    assert written.parallelism.eplb.enabled is False  # the written spec is untouched
    chosen = plan(effective)
    assert chosen.redundant_experts == 8 and chosen.experts_per_rank == (128 + 8) // 8

    # The record holds while the spec allows it; removing apply (or auto) drops it.
    status_body = {"eplbApplied": record}
    assert eplb_advisor.applied(written, status_body) == record
    assert eplb_advisor.applied(_spec(mode="auto"), status_body) is None
    assert eplb_advisor.applied(_spec(), status_body) is None
    assert eplb_advisor.effective(written, None) is written


def test_applied_condition_says_what_was_done_and_how_to_undo_it() -> None:
    record = {"redundantExperts": 8, "imbalance": 1.5, "time": "2026-12-05T00:00:00Z"}
    inputs = status.Inputs(
        name="d",
        generation=1,
        now="2026-12-05T00:00:00Z",
        ray_service={"metadata": {"generation": 1}, "status": {}},
        live=live.LiveStatus(0.0, 1, 1, None, None),  # the advisor is off once EPLB is on
        eplb_auto=True,
        eplb_applied=record,
    )
    out = status.compute(inputs)
    assert out["eplbApplied"] == record
    cond = {c["type"]: c for c in out["conditions"]}[status.EPLB_CONDITION]
    assert cond["status"] == "True" and cond["reason"] == "Applied"
    assert "redundantExperts 8" in cond["message"] and "eplb.apply" in cond["message"]
    # The status model (the CRD's schema) accepts the record.
    assert MoEDeploymentStatus.model_validate(out).eplb_applied is not None
