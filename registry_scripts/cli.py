"""`kronos-registry`: log, fine-tune, evaluate, promote, roll back, inspect Kronos versions; live accuracy.

Registry: $MLFLOW_TRACKING_URI (default: the project's sqlite file .state/mlflow/mlflow.db,
shared with `make serve`); registered model: --name or $KRONOS_REGISTERED_MODEL (`kronos`).

Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 gate refused, 4 registry unreachable,
5 not found (unknown model/alias/version, no earlier champion to roll back to, a
checkpoint that cannot be resolved, nothing to resume), 6 bad data (file missing,
unreadable or not long-format candles; too short for one training window), 7 not
authenticated (HTTP 401), 8 permission denied (HTTP 403), 130 interrupted (finetune:
state saved, continue with --resume).

Authenticated server (`mlflow server --app-name kronos-auth`): MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_PASSWORD_FILE (a secret file); the admin
provisions the accounts with `auth-setup` (docs/registry-auth.md).

Fine-tuning on several processes: torchrun --nproc_per_node N -m registry_scripts finetune ...
(DistributedDataParallel; only rank 0 talks to MLflow).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import errors
from .errors import CliError

Handler = Callable[[argparse.Namespace], int]


def _flag(text: str) -> bool:
    """A flag that may also be spelled `--flag true|false` (MLproject passes values)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _text(value: str) -> str | None:
    """An optional string where "" means not given (MLproject defaults)."""
    return value or None


def _add_flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(name, nargs="?", const=True, default=False, type=_flag, metavar="BOOL", help=help_text)


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """`kind`, except that "" means not given (None): MLproject passes empty defaults."""

    def parse(text: str) -> Any:
        return kind(text) if text.strip() else None

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in errors
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_log(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("log", parents=[common], help="register a checkpoint as a new version (alias challenger)")
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="hub id or directory (same as --model)")
    p.add_argument(
        "--model", type=_text, help="predictor hub id or local checkpoint dir (default NeoQuasar/Kronos-small)"
    )
    p.add_argument("--tokenizer", type=_text, help="tokenizer hub id or dir (default: the model's published tokenizer)")
    p.add_argument("--revision", type=_text, help="hub revision of the model")
    p.add_argument("--tokenizer-revision", type=_text, help="hub revision of the tokenizer")
    p.add_argument("--max-context", type=_positive, help="context length (default: the checkpoint's)")
    _add_flag(
        p,
        "--demo",
        "the shipped demo pair (small, trained on daily S&P 500 / NASDAQ bars; "
        "model_package/demo_weights/MODEL_CARD.md), tagged kronos.demo=true",
    )
    p.add_argument(
        "--demo-seed",
        type=_optional(int),
        help="with --demo: RANDOM weights of this seed instead (workflow tests only)",
    )
    _add_flag(p, "--if-no-champion", "do nothing when a champion exists")
    _add_flag(p, "--promote", "also make the new version champion (recorded)")
    p.add_argument("--reason", type=_text, help="reason recorded with --promote")
    p.set_defaults(handler=_run_log)


def _add_finetune(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, with_training: bool = True) -> None:
    p = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune a base on candles; registers the result (alias challenger)",
        description="Fine-tune a Kronos pair on candles in one MLflow run (experiment kronos-finetune) and "
        "register the result as a new version with alias challenger and kronos.lineage.* tags. "
        "Ctrl-C / SIGTERM saves the state (exit 130); rerun with --resume to continue the same run. "
        "Several processes: torchrun --nproc_per_node N -m registry_scripts finetune ...",
    )
    p.add_argument(
        "--base",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a hub id (NeoQuasar/Kronos-small) or a directory "
        "(a checkpoint, or a pair with tokenizer/ and model/)",
    )
    p.add_argument("--data", required=True, help="long-format .csv / .parquet, or arch:SP500, arch:NASDAQ, arch:ALL")
    p.add_argument(
        "--tokenizer",
        type=_text,
        help="tokenizer dir or hub id, for hub id / directory bases without a published tokenizer pairing",
    )
    p.add_argument("--work-dir", type=_optional(Path), help="resumable state (default .state/finetune/<digest>)")
    _add_flag(p, "--resume", "continue the interrupted fine-tune of --work-dir (same options)")
    _add_flag(p, "--no-progress", "no progress bar on stderr")
    p.add_argument("--max-context", type=_optional(_positive), help="context of the new version (default: the base's)")
    if with_training:  # model_package.finetune imports torch: only when this command runs
        from model_package.finetune import add_training_arguments

        add_training_arguments(p)
        for action in p._actions:  # MLproject passes "" for "default"
            if action.dest in ("lr", "clip_grad", "max_steps_per_epoch") and action.type is not None:
                action.type = _optional(action.type)
    p.set_defaults(handler=_run_finetune)


def _add_evaluate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", parents=[common], help="rolling-origin backtest vs persistence")
    p.add_argument(
        "refs",
        nargs="*",
        metavar="VERSION",
        help="versions or aliases (default: challenger and champion, those that exist)",
    )
    p.add_argument("--versions", type=_text, help="the same as a space- or comma-separated list")
    p.add_argument("--data", type=_text, help="long-format CSV or Parquet (default: daily S&P 500 from arch)")
    p.add_argument("--index", default="SP500", choices=["SP500", "NASDAQ"], help="arch index when no --data")
    p.add_argument("--windows", type=_positive, default=6, help="windows per series (default 6)")
    p.add_argument("--context", type=_positive, default=128, help="history candles per window (default 128)")
    p.add_argument("--horizon", type=_positive, default=10, help="forecast candles per window (default 10)")
    p.add_argument("--step", type=_positive, help="candles between origins (default: horizon)")
    p.add_argument("--samples", type=_positive, default=8, help="sample paths per window (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--band",
        type=float,
        nargs=2,
        default=(0.1, 0.9),
        metavar=("LOW", "HIGH"),
        help="quantile band for coverage (default 0.1 0.9)",
    )
    p.set_defaults(handler=_run_evaluate)


def _add_promote(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("promote", parents=[common], help="move champion to a version if the gate passes")
    p.add_argument("ref", nargs="?", metavar="VERSION", help="version or alias (default challenger)")
    p.add_argument("--version", dest="version_opt", metavar="N", help="same as VERSION")
    p.add_argument("--max-mase", type=float, default=1.0, help="candidate MASE must be below (default 1)")
    p.add_argument(
        "--tolerance", type=float, default=0.02, help="allowed relative MASE loss vs champion (default 0.02)"
    )
    p.add_argument(
        "--evidence",
        choices=("backtest", "live"),
        default="backtest",
        help="gate on the backtest tags (`evaluate`, default) or on live accuracy: the forecasts the candidate "
        "answered as shadow challenger and the champion answered for the same requests",
    )
    p.add_argument(
        "--min-forecasts",
        type=_positive,
        default=200,
        metavar="N",
        help="live evidence: realised forecast candles both answered (default 200)",
    )
    _add_live_store(p)
    _add_flag(p, "--force", "skip the gate (needs --reason)")
    p.add_argument("--reason", type=_text, help="why (recorded in the event log)")
    p.set_defaults(handler=_run_promote)


def _add_rollback(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("rollback", parents=[common], help="move champion back one promotion")
    p.add_argument("--to-version", type=_text, metavar="N", help="roll back to this version instead")
    p.add_argument("--reason", type=_text, help="why (recorded in the event log)")
    p.set_defaults(handler=_run_rollback)


def _add_history(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for command in ("history", "show"):
        p = sub.add_parser(command, parents=[common], help="versions, aliases, metrics and events")
        p.add_argument("ref", nargs="?", metavar="VERSION", help="show one version's tags in detail")
        p.set_defaults(handler=_run_history)


def _add_auth_setup(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "auth-setup",
        parents=[common],
        help="(admin) create the serving/scientist/manager accounts and their permissions",
        description="As the MLflow admin, on a server run with --app-name kronos-auth: create or update the "
        "accounts KRONOS_AUTH_{SERVING,SCIENTIST,MANAGER}_USER (passwords from KRONOS_AUTH_{ROLE}_PASSWORD_FILE "
        "or KRONOS_AUTH_{ROLE}_PASSWORD, never arguments), create the registered model and the CLI's experiments "
        "if missing, and grant READ / EDIT / MANAGE on the model. Idempotent; rerun to rotate passwords.",
    )
    p.set_defaults(handler=_run_auth_setup)


def _add_live_store(parser: argparse.ArgumentParser) -> None:
    """--store and --window-days: where live accuracy is read."""
    parser.add_argument(
        "--store", type=_text, metavar="URI", help="live store (default $KRONOS_LIVE_STORE_URI or .state/live.db)"
    )
    parser.add_argument("--window-days", type=_optional(float), metavar="D", help="rolling window (default 7 days)")


def _add_live(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "live",
        parents=[common],
        help="store realised candles and print live accuracy per version and horizon",
        description="Realised candles (--actuals FILE: CSV or Parquet with series_id, timestamp, close) go into "
        "the live store the model servers record their answers in; then the live accuracy table (MAE, MASE "
        "against persistence, directional accuracy, CRPS, band coverage) per role, version and horizon bucket "
        "over the window is printed.",
    )
    p.add_argument("--actuals", type=_optional(Path), metavar="FILE", help="realised candles to store first")
    _add_live_store(p)
    _add_flag(p, "--json", "print JSON instead of a table")
    p.set_defaults(handler=_run_live)


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    """The argparse tree of every subcommand (`with_training=False`: without finetune's
    training options, which need torch)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", help="registered model name (default $KRONOS_REGISTERED_MODEL or kronos)")
    parser = argparse.ArgumentParser(
        prog="kronos-registry",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_log(sub, common)
    _add_finetune(sub, common, with_training)
    for add in (_add_evaluate, _add_promote, _add_rollback, _add_history, _add_live, _add_auth_setup):
        add(sub, common)
    return parser


# -- handlers (imports are local: `history` should not pay for torch) ------------------------


def _run_log(args: argparse.Namespace) -> int:
    from .log_version import LogRequest, log_version
    from .registry import connect

    if args.model_arg and args.model:
        raise CliError("give the model once: MODEL or --model", errors.USAGE)
    if args.demo and (args.model_arg or args.model or args.tokenizer):
        raise CliError("--demo brings its own weights; drop MODEL/--model/--tokenizer", errors.USAGE)
    if args.demo_seed is not None and not args.demo:
        raise CliError("--demo-seed goes with --demo", errors.USAGE)
    request = LogRequest(
        args.model_arg or args.model,
        args.tokenizer,
        args.demo,
        args.demo_seed,
        args.revision,
        args.tokenizer_revision,
        args.max_context,
        args.if_no_champion,
        args.promote,
        args.reason,
    )
    log_version(connect(args.name), request)
    return errors.OK


def _run_live(args: argparse.Namespace) -> int:
    from .live import LiveRequest, run_live

    if args.window_days is not None and args.window_days <= 0:
        raise CliError(f"--window-days must be > 0, got {args.window_days}", errors.USAGE)
    window_s = args.window_days * 86400 if args.window_days is not None else None
    print(run_live(LiveRequest(args.store, args.actuals, window_s, args.json)))
    return errors.OK


def _run_finetune(args: argparse.Namespace) -> int:
    from model_package.finetune import settings_from_args

    from .finetune import FinetuneRequest, run_finetune

    windows, settings = settings_from_args(args)
    request = FinetuneRequest(
        base=args.base,
        data=args.data,
        tokenizer=args.tokenizer,
        stage=args.stage,
        windows=windows,
        settings=settings,
        work_dir=args.work_dir,
        resume=args.resume,
        progress=not args.no_progress,
        max_context=args.max_context,
    )
    run_finetune(request, args.name)
    return errors.OK


def _run_evaluate(args: argparse.Namespace) -> int:
    from .data import load_candles
    from .errors import NotFoundError
    from .registry import CHALLENGER, CHAMPION, connect

    low, high = args.band
    if not 0 < low < high < 1:
        raise CliError(f"--band needs 0 < LOW < HIGH < 1, got {low} {high}", errors.USAGE)
    registry = connect(args.name)
    registry.require_model()
    candles, data = load_candles(args.data, args.index)  # a bad file fails before any model loads
    refs = list(args.refs) + (args.versions or "").replace(",", " ").split()
    refs = refs or [a for a in (CHALLENGER, CHAMPION) if registry.alias_version(a) is not None]
    if not refs:
        raise NotFoundError(f"model {registry.model_name!r} has neither {CHALLENGER} nor {CHAMPION}; name versions")
    versions: dict[str, Any] = {}
    for ref in refs:
        version = registry.resolve(ref)
        versions.setdefault(str(version.version), version)

    from .backtest import BacktestSpec
    from .evaluate import evaluate, format_results

    spec = BacktestSpec(args.windows, args.context, args.horizon, args.step, args.samples, args.seed, (low, high))
    results = evaluate(registry, list(versions.values()), candles, data, spec)
    print(f"evaluated on {data}: {spec.describe()}")
    print(format_results(results))
    return errors.OK


def _run_promote(args: argparse.Namespace) -> int:
    from .gate import GatePolicy
    from .promote import LiveEvidence, promote
    from .registry import CHALLENGER, connect

    if args.ref and args.version_opt:
        raise CliError("give the version once: VERSION or --version", errors.USAGE)
    if args.window_days is not None and args.window_days <= 0:
        raise CliError(f"--window-days must be > 0, got {args.window_days}", errors.USAGE)
    window_s = args.window_days * 86400 if args.window_days is not None else None
    live = LiveEvidence(args.store, window_s) if args.evidence == "live" else None
    promote(
        connect(args.name),
        args.version_opt or args.ref or CHALLENGER,
        GatePolicy(args.max_mase, args.tolerance, args.min_forecasts),
        args.force,
        args.reason,
        live,
    )
    return errors.OK


def _run_rollback(args: argparse.Namespace) -> int:
    from .promote import rollback
    from .registry import connect

    rollback(connect(args.name), args.to_version, args.reason)
    return errors.OK


def _run_history(args: argparse.Namespace) -> int:
    from .history import history
    from .registry import connect

    print(history(connect(args.name), args.ref))
    return errors.OK


def _run_auth_setup(args: argparse.Namespace) -> int:
    from .auth_setup import auth_setup
    from .registry import connect

    print("\n".join(auth_setup(connect(args.name))))
    return errors.OK


# -- errors -> one line + exit code --------------------------------------------------------------


def _refusal(exc: BaseException) -> tuple[int, str] | None:
    """(401 or 403, the refused request) when the registry refused us, searching the causes."""
    import requests
    from mlflow.exceptions import MlflowException

    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            break
        response = getattr(current, "response", None)
        if isinstance(current, requests.HTTPError) and response is not None and response.status_code in (401, 403):
            request = response.request
            return response.status_code, f"{request.method} {urlparse(str(request.url)).path}" if request else ""
        if isinstance(current, MlflowException) and current.get_http_status_code() in (401, 403):
            endpoint = re.search(r"endpoint (\S+) failed with error code", str(current))
            return current.get_http_status_code(), endpoint.group(1) if endpoint else ""
        current = current.__cause__ or current.__context__
    return None


def _auth_message(status: int, request: str) -> tuple[int, str]:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        who = f"user {user!r} and its password were rejected" if user else "no credentials were given"
        return errors.UNAUTHENTICATED, (
            f"not authenticated by the registry ({who}): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_PASSWORD_FILE"
        )
    who = f" for user {user!r}" if user else ""
    what = f" ({request})" if request else ""
    need = (
        "moving champion (a managed alias) needs MANAGE on the registered model"
        if "registered-models/alias" in request
        else "ask the registry admin for the permission"
    )
    return errors.PERMISSION_DENIED, f"permission denied{who}{what}: {need} (docs/registry-auth.md)"


def classify(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for an exception escaping a handler."""
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    import requests
    from mlflow.exceptions import MlflowException

    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    if type(exc).__name__ == "CredentialsError":  # model_package.credentials (not imported: torch)
        return errors.UNAUTHENTICATED, f"credentials: {text}"
    refused = _refusal(exc)
    if refused is not None:
        return _auth_message(*refused)
    if type(exc).__name__ == "CheckpointError":
        return errors.NOT_FOUND, f"checkpoint not usable: {text}"
    if isinstance(exc, requests.ConnectionError | requests.Timeout | ConnectionError):
        return errors.UNREACHABLE, f"registry unreachable: {text}"
    if type(exc).__name__ == "OperationalError" or "could not connect" in text.lower():
        return errors.UNREACHABLE, f"registry unreachable: {text}"
    if isinstance(exc, MlflowException):
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return errors.NOT_FOUND, f"not found: {text}"
        if "max retries exceeded" in text.lower() or "connection" in text.lower():
            return errors.UNREACHABLE, f"registry unreachable: {text}"
    return errors.UNEXPECTED, f"unexpected {type(exc).__name__}: {text} (KRONOS_REGISTRY_DEBUG=1 for a traceback)"


def _quiet() -> None:
    """Keep stderr for our messages: MLflow's INFO chatter and library warnings off."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _load_credentials() -> None:
    """MLFLOW_TRACKING_*_FILE -> the variables MLflow's client reads (model_package imports
    torch: only imported when a file is named)."""
    if any(os.environ.get(f"MLFLOW_TRACKING_{name}_FILE") for name in ("USERNAME", "PASSWORD")):
        from model_package.credentials import load_tracking_credentials

        load_tracking_credentials()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kronos-registry` and `python -m registry_scripts`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_training="finetune" in argv).parse_args(argv)
    debug = os.environ.get("KRONOS_REGISTRY_DEBUG") == "1"
    if not debug:
        _quiet()
    try:
        _load_credentials()
        return args.handler(args)
    except KeyboardInterrupt:
        print("kronos-registry: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        code, message = classify(exc)
        kind = "" if code == errors.INTERRUPTED else "error: "
        print(f"kronos-registry {args.command}: {kind}{message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
