"""`history` / `show`: versions, aliases, evaluation metrics and champion events as text."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from .events import read_events
from .registry import Registry


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _created(timestamp_ms: int | None) -> str:
    if not timestamp_ms:
        return "-"
    return datetime.fromtimestamp(int(timestamp_ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def versions_table(registry: Registry) -> str:
    """One row per version: aliases, weights, demo flag and the latest evaluation."""
    aliases: dict[str, list[str]] = {}
    for alias, version in (registry.client.get_registered_model(registry.model_name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in registry.versions():
        tags = v.tags or {}
        rows.append(
            [
                v.version,
                ",".join(sorted(aliases.get(str(v.version), []))) or None,
                _created(v.creation_timestamp),
                tags.get("kronos.weights.source"),
                "DEMO" if tags.get("kronos.demo") == "true" else None,
                tags.get("eval.mase"),
                tags.get("eval.mae"),
                tags.get("eval.crps"),
                tags.get("eval.coverage"),
                tags.get("eval.setup"),
            ]
        )
    return table(
        ["version", "aliases", "created", "weights", "demo", "mase", "mae", "crps", "coverage", "eval_setup"], rows
    )


def events_table(registry: Registry) -> str:
    """One row per recorded promotion / rollback, oldest first."""
    rows = [
        [
            f"{e['seq']:04d}",
            e.get("at"),
            e.get("action"),
            e.get("version"),
            e.get("previous"),
            e.get("user"),
            "yes" if e.get("forced") else None,
            e.get("reason"),
        ]
        for e in read_events(registry)
    ]
    return table(["event", "at", "action", "version", "previous", "user", "forced", "reason"], rows)


def version_detail(registry: Registry, ref: str) -> str:
    """Every tag of one version, plus its aliases and source."""
    version = registry.resolve(ref)
    lines = [
        f"{registry.model_name} version {version.version}",
        f"  aliases: {', '.join(version.aliases or []) or '-'}",
        f"  created: {_created(version.creation_timestamp)}",
        f"  run_id:  {version.run_id}",
        f"  source:  {version.source}",
    ]
    lines += [f"  {key} = {value}" for key, value in sorted((version.tags or {}).items())]
    return "\n".join(lines)


def history(registry: Registry, ref: str | None = None) -> str:
    """The full report (or one version's detail when `ref` is given)."""
    registry.require_model()
    if ref is not None:
        return version_detail(registry, ref)
    return "\n".join(
        [
            f"registered model {registry.model_name!r} at {registry.uri}",
            "",
            "versions",
            versions_table(registry),
            "",
            "champion events",
            events_table(registry),
        ]
    )
