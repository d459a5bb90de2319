"""Every `registry_scripts` entry point of the MLproject, rendered by MLflow with its
defaults (plus the required params), parses with the CLI's own parser: a param renamed on
one side only fails here instead of in a user's `mlflow run`."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from mlflow.projects._project_spec import load_project

from registry_scripts.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"finetune": {"data": "arch:SP500"}}


def registry_entry_points() -> list[str]:
    project = load_project(str(ROOT))
    return sorted(
        name
        for name, entry in project._entry_points.items()  # noqa: SLF001 - no public listing
        if entry.command.startswith("python -m registry_scripts")
    )


@pytest.mark.parametrize("name", registry_entry_points())
def test_the_entry_point_command_parses(name: str, tmp_path: Path) -> None:
    entry = load_project(str(ROOT)).get_entry_point(name)
    command = entry.compute_command(REQUIRED.get(name, {}), str(tmp_path))
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "registry_scripts"]
    args = build_parser(with_training=name == "finetune").parse_args(argv[3:])
    assert args.command == name


def test_the_live_and_promote_entry_points_exist() -> None:
    assert {"live", "promote"} <= set(registry_entry_points())
