"""The live-evidence promotion gate (`registry_scripts.gate.check_live`) on paired metrics."""

from __future__ import annotations

import math

from registry_scripts.gate import GatePolicy, check_live

POLICY = GatePolicy(tolerance=0.02, min_forecasts=100)


def paired(champion_mase: float, candidate_mase: float, count: int = 150) -> dict[str, dict]:
    return {"1": {"forecasts": count, "mase": champion_mase}, "2": {"forecasts": count, "mase": candidate_mase}}


def test_a_candidate_within_the_tolerance_passes_with_its_numbers():
    decision = check_live("2", "1", paired(1.10, 1.12), POLICY)
    assert decision.passed, decision.summary()
    assert decision.numbers["evidence"] == "live" and decision.numbers["matched_forecasts"] == 150
    assert (decision.numbers["champion_mase"], decision.numbers["candidate_mase"]) == (1.10, 1.12)
    assert "150 shared forecasts" in decision.summary()


def test_worse_than_the_champion_beyond_the_tolerance_is_refused():
    decision = check_live("2", "1", paired(1.0, 1.03), POLICY)
    assert not decision.passed
    assert "x (1 + 0.02) = 1.0200" in decision.summary()


def test_too_little_evidence_is_refused_before_any_comparison():
    decision = check_live("2", "1", paired(2.0, 0.5, count=99), POLICY)
    assert not decision.passed
    assert "99 realised forecast candles answered by both" in decision.summary() and ">= 100" in decision.summary()
    assert check_live("2", "1", {}, POLICY).numbers["matched_forecasts"] == 0


def test_no_champion_or_no_movement_gives_no_evidence():
    assert not check_live("2", None, paired(1.0, 0.9), POLICY).passed
    assert not check_live("2", "2", paired(1.0, 0.9), POLICY).passed
    flat = check_live("2", "1", paired(math.nan, math.nan), POLICY)
    assert not flat.passed and "no live MASE" in flat.summary()
