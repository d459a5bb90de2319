"""The promotion gate: a candidate must beat persistence on MASE and not be worse than the
current champion (same evaluation setup) beyond a relative tolerance."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion


@dataclass(frozen=True)
class GatePolicy:
    """max_mase: candidate MASE must be below it; tolerance: allowed relative MASE loss
    against the champion (0.02 = 2 % worse is still accepted)."""

    max_mase: float = 1.0
    tolerance: float = 0.02


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
