"""`python -m serving`: register a champion if needed, then run MLServer on 127.0.0.1.

    python -m serving                 # embedded sqlite registry under .state/mlflow
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m serving --no-bootstrap

MLServer reads serving/settings.json (ports, 127.0.0.1) and serving/models/kronos/.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
STATE = ROOT / ".state"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-bootstrap", action="store_true", help="do not register a champion when the registry has none"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    default_db = STATE / "mlflow" / "mlflow.db"
    default_db.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{default_db}")
    if not args.no_bootstrap:
        from .bootstrap import ensure_champion

        ensure_champion(os.environ["MLFLOW_TRACKING_URI"], STATE / "mlflow" / "artifacts")
    metrics_dir = STATE / "mlserver-metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLSERVER_METRICS_DIR", str(metrics_dir))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    mlserver = Path(sys.executable).with_name("mlserver")
    os.execve(str(mlserver), [str(mlserver), "start", str(SERVING)], env)


if __name__ == "__main__":
    sys.exit(main())
