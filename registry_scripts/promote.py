"""`promote` and `rollback`: move the `champion` alias, gated or forced, and record why."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CliError, GateRefusedError, NotFoundError
from .events import append_event, champion_lineage, read_events
from .gate import GatePolicy, check, check_live
from .registry import CHALLENGER, CHAMPION, Registry


@dataclass(frozen=True)
class LiveEvidence:
    """Where the live gate reads: the live store (None: the default one) and its window."""

    store: str | None = None
    window_s: float | None = None


def promote(
    registry: Registry,
    ref: str,
    policy: GatePolicy,
    force: bool,
    reason: str | None,
    live: LiveEvidence | None = None,
) -> str:
    """Make version `ref` (default: challenger) champion when the gate passes or `force`.
    The gate reads the backtest tags, or with `live` the live store (`gate.check_live`)."""
    if force and not (reason and reason.strip()):
        raise CliError('--force needs --reason "why" (it is recorded)', 2)
    candidate = registry.resolve(ref)
    previous = registry.alias_version(CHAMPION)
    if previous == str(candidate.version):
        print(f"version {candidate.version} is already {CHAMPION}; nothing to do")
        return str(candidate.version)
    if live is None:
        champion = registry.resolve(CHAMPION) if previous is not None else None
        decision = check(candidate, champion, policy)
    else:
        from .live import paired_metrics

        paired = paired_metrics(live.store, previous, str(candidate.version), live.window_s) if previous else {}
        decision = check_live(str(candidate.version), previous, paired, policy)
    if not decision.passed and not force:
        raise GateRefusedError(
            f"gate refused version {candidate.version}: {decision.summary()}; {CHAMPION} stays at {previous or 'none'}"
        )
    name, version = registry.model_name, str(candidate.version)
    registry.client.set_registered_model_alias(name, CHAMPION, version)
    if registry.alias_version(CHALLENGER) == version:
        registry.client.delete_registered_model_alias(name, CHALLENGER)
    append_event(
        registry,
        "promote",
        version,
        previous,
        reason or decision.summary(),
        forced=bool(force and not decision.passed),
        gate=decision.numbers,
    )
    registry.client.set_model_version_tag(name, version, "kronos.promoted", "true")
    verdict = "FORCED past the gate" if force and not decision.passed else "gate passed"
    print(
        f"promoted {name} version {version} to {CHAMPION} ({verdict}: {decision.summary()}); "
        f"previous {CHAMPION}: {previous or 'none'}"
    )
    return version


def rollback(registry: Registry, to_version: str | None, reason: str | None) -> str:
    """Move champion back one promotion (or to `to_version`); recorded as an event."""
    current = registry.alias_version(CHAMPION)
    if to_version is not None:
        target = str(registry.resolve(to_version).version)
    else:
        lineage = champion_lineage(read_events(registry))
        if current is not None and (not lineage or lineage[-1] != current):
            lineage.append(current)  # champion was moved outside this tool
        if len(lineage) < 2:
            registry.require_model()
            raise NotFoundError(
                f"no earlier champion of {registry.model_name!r} to roll back to (current: {current or 'none'})"
            )
        target = lineage[-2]
        registry.resolve(target)
    if target == current:
        print(f"version {target} is already {CHAMPION}; nothing to do")
        return target
    registry.client.set_registered_model_alias(registry.model_name, CHAMPION, target)
    append_event(registry, "rollback", target, current, reason or "rollback")
    print(f"rolled back {registry.model_name}@{CHAMPION}: {current or 'none'} -> {target}")
    return target
