"""The append-only event log of promotions and rollbacks, kept as registered-model tags.

MLflow keeps no alias history, so every champion move is written as a tag
`kronos.event.0001`, `kronos.event.0002`, ... whose value is a JSON object:
`{"seq", "action", "version", "previous", "user", "at", "reason", "forced", ...}`.
The champion lineage (what `rollback` steps back through) is replayed from these events.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import UTC, datetime
from typing import Any

from .registry import Registry

EVENT_PREFIX = "kronos.event."
MAX_TAG_CHARS = 4000  # registered-model tag values are limited (5000 on most stores)


def who() -> str:
    """`user@host`, or $KRONOS_USER when set (CI, service accounts)."""
    user = os.environ.get("KRONOS_USER")
    if user:
        return user
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "unknown"
    return f"{name}@{socket.gethostname()}"


def read_events(registry: Registry) -> list[dict[str, Any]]:
    """All recorded events, in order (oldest first)."""
    if not registry.model_exists():
        return []
    tags = registry.client.get_registered_model(registry.model_name).tags or {}
    events = []
    for key, value in tags.items():
        if not key.startswith(EVENT_PREFIX):
            continue
        try:
            event = json.loads(value)
        except json.JSONDecodeError:
            event = {"action": "unreadable", "raw": value[:80]}
        event["seq"] = int(key.removeprefix(EVENT_PREFIX))
        events.append(event)
    return sorted(events, key=lambda e: e["seq"])


def append_event(
    registry: Registry, action: str, version: str, previous: str | None, reason: str | None, **extra: Any
) -> dict[str, Any]:
    """Record one champion move; returns the stored event."""
    events = read_events(registry)
    seq = (events[-1]["seq"] + 1) if events else 1
    event = {
        "seq": seq,
        "action": action,
        "version": str(version),
        "previous": str(previous) if previous is not None else None,
        "user": who(),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": reason,
        **extra,
    }
    value = json.dumps(event, sort_keys=True, separators=(",", ":"))
    if len(value) > MAX_TAG_CHARS:
        event["reason"] = (reason or "")[:500]
        value = json.dumps(event, sort_keys=True, separators=(",", ":"))[:MAX_TAG_CHARS]
    registry.client.set_registered_model_tag(registry.model_name, f"{EVENT_PREFIX}{seq:04d}", value)
    return event


def champion_lineage(events: list[dict[str, Any]]) -> list[str]:
    """The stack of champions that rollback walks back through, replayed from the events:
    a promotion pushes its version, a rollback pops back to the version it restored."""
    stack: list[str] = []
    for event in events:
        version = event.get("version")
        if event.get("action") == "promote" and version is not None:
            stack.append(str(version))
        elif event.get("action") == "rollback" and version is not None:
            earlier = [i for i, v in enumerate(stack[:-1]) if v == str(version)]
            if earlier:
                del stack[earlier[-1] + 1 :]
            else:
                stack.append(str(version))
    return stack
