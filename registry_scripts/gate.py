"""The promotion gates. On backtest evidence (`kronos-registry evaluate` tags): a candidate
must beat persistence on MASE and not be worse than the current champion (same evaluation
setup) beyond a relative tolerance. On live evidence (`check_live`): at least
`min_forecasts` realised forecast candles that both versions answered for the same requests
in production (the candidate as the shadow challenger), and on them the candidate's MASE
not worse than the champion's beyond the tolerance (`max_mase` is not applied there; both
MASEs are recorded in the promotion event)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion


@dataclass(frozen=True)
class GatePolicy:
    """max_mase: candidate MASE must be below it; tolerance: allowed relative MASE loss
    against the champion (0.02 = 2 % worse is still accepted)."""

    max_mase: float = 1.0
    tolerance: float = 0.02
    min_forecasts: int = 200  # live evidence: matched forecast candles both versions answered


@dataclass
class GateDecision:
    """The verdict and the numbers behind it."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, float | str | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.passed = False
        self.failures.append(reason)

    def summary(self) -> str:
        """The failed checks when refused, else every check that passed."""
        return "; ".join(self.failures or self.reasons)


def _mase(version: ModelVersion) -> float | None:
    value = (version.tags or {}).get("eval.mase")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def check(candidate: ModelVersion, champion: ModelVersion | None, policy: GatePolicy) -> GateDecision:
    """Decide whether `candidate` may replace `champion` (None: no champion yet)."""
    tags = candidate.tags or {}
    mase = _mase(candidate)
    numbers: dict[str, float | str | None] = {
        "candidate": candidate.version,
        "candidate_mase": mase,
        "max_mase": policy.max_mase,
        "tolerance": policy.tolerance,
        "setup": tags.get("eval.setup"),
    }
    if mase is None:
        decision = GateDecision(True, [], numbers)
        decision.fail(f"version {candidate.version} has no evaluation (run `kronos-registry evaluate` first)")
        return decision
    decision = GateDecision(True, [], numbers)
    if mase < policy.max_mase:
        beats = " (beats persistence)" if policy.max_mase <= 1 else ""
        decision.reasons.append(f"MASE {mase:.4f} < {policy.max_mase:g}{beats}")
    else:
        decision.fail(
            f"MASE {mase:.4f} >= {policy.max_mase:g}: does not beat persistence "
            f"(MAE {tags.get('eval.mae')} vs persistence {tags.get('eval.persistence_mae')})"
        )
    if champion is None or champion.version == candidate.version:
        return decision
    numbers["champion"] = champion.version
    champion_mase = _mase(champion)
    numbers["champion_mase"] = champion_mase
    if champion_mase is None or (champion.tags or {}).get("eval.setup") != tags.get("eval.setup"):
        decision.fail(
            f"champion v{champion.version} has no evaluation on the same setup "
            f"(run `kronos-registry evaluate {candidate.version} champion`)"
        )
        return decision
    limit = champion_mase * (1 + policy.tolerance)
    if mase <= limit:
        decision.reasons.append(
            f"MASE {mase:.4f} <= champion v{champion.version} {champion_mase:.4f} x (1 + {policy.tolerance:g})"
        )
    else:
        decision.fail(
            f"MASE {mase:.4f} > champion v{champion.version} {champion_mase:.4f} "
            f"x (1 + {policy.tolerance:g}) = {limit:.4f}"
        )
    return decision


def check_live(candidate: str, champion: str | None, paired: dict[str, dict], policy: GatePolicy) -> GateDecision:
    """Decide on live evidence: `paired` maps each version to its metrics on the shared
    forecast candles (`serving.live.accuracy.paired_accuracy` rows by version)."""
    mine = paired.get(str(candidate), {})
    count = int(mine.get("forecasts") or 0)
    mase = mine.get("mase")
    numbers: dict[str, float | str | None] = {
        "evidence": "live",
        "candidate": str(candidate),
        "candidate_mase": _number(mase),
        "matched_forecasts": count,
        "min_forecasts": policy.min_forecasts,
        "tolerance": policy.tolerance,
    }
    decision = GateDecision(True, [], numbers)
    if champion is None or str(champion) == str(candidate):
        decision.fail("live evidence compares the candidate with a champion; there is none to compare with")
        return decision
    theirs = paired.get(str(champion), {})
    champion_mase = _number(theirs.get("mase"))
    numbers.update(champion=str(champion), champion_mase=champion_mase)
    if count < policy.min_forecasts:
        decision.fail(
            f"{count} realised forecast candles answered by both v{candidate} and champion v{champion} "
            f"(need >= {policy.min_forecasts}: send traffic with the challenger shadowing, then the actuals)"
        )
        return decision
    if numbers["candidate_mase"] is None or champion_mase is None:
        decision.fail("no live MASE: the realised candles never moved from the last close")
        return decision
    value = float(numbers["candidate_mase"])
    limit = champion_mase * (1 + policy.tolerance)
    if value <= limit:
        decision.reasons.append(
            f"live MASE {value:.4f} <= champion v{champion} {champion_mase:.4f} x (1 + {policy.tolerance:g}) "
            f"on {count} shared forecasts"
        )
    else:
        decision.fail(
            f"live MASE {value:.4f} > champion v{champion} {champion_mase:.4f} "
            f"x (1 + {policy.tolerance:g}) = {limit:.4f}"
        )
    return decision


def _number(value: object) -> float | None:
    """A finite float, else None (NaN and missing alike)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None
