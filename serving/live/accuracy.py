"""Live-accuracy metrics of matched forecasts (`LiveStore.matched()` rows), per group.

Per forecast candle, with A the actual close, F the forecast (mean) close, L the history's
last close (the persistence forecast) and q_tau the recorded close quantiles:

- e = (A - F) / |L|, the forecast error relative to the last close, and
  p = (A - L) / |L|, the persistence ("no change") error, so series of any price level
  mix. |L| (not L) keeps the sign of spreads' errors meaningful; rows with L == 0 have no
  relative error: they count in `forecasts`, `directional_accuracy` and `coverage` only.

Per group:

- forecasts: the number of matched forecast candles (int).
- mae: mean |e|.
- mase: sum |e| / sum |p| over the same candles, the MAE against persistence (< 1 beats
  "no change"); NaN when sum |p| == 0.
- directional_accuracy: the share of candles where sign(F - L) == sign(A - L), over those
  with A != L (a flat forecast F == L is a miss there); NaN when every A == L.
- crps: the continuous ranked probability score from the recorded quantiles,
  CRPS ~= 2 * mean over tau in LIVE_LEVELS of rho_tau(A - q_tau), divided by |L|, with the
  pinball loss rho_tau(u) = max(tau * u, (tau - 1) * u); the group's mean.
- coverage: the share of candles with q_lo <= A <= q_hi for BAND = (lo, hi) (nominal hi - lo,
  0.8).

Horizon buckets (`horizon` column, from `step`): "1", "2-5", "6-20", "21+".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .store import BAND, LIVE_LEVELS, level_column

HORIZON_BUCKETS: tuple[tuple[int, int | None, str], ...] = (
    (1, 1, "1"),
    (2, 5, "2-5"),
    (6, 20, "6-20"),
    (21, None, "21+"),
)
METRICS = ("forecasts", "mae", "mase", "directional_accuracy", "crps", "coverage")
_BUCKET_LABELS = tuple(label for _, _, label in HORIZON_BUCKETS)
_NEEDED = ("step", "last_close", "mean_close", "actual_close", *(level_column(level) for level in LIVE_LEVELS))


def horizon_bucket(step: int) -> str:
    """The label of the bucket holding a 1-based horizon step: 1 -> "1", 7 -> "6-20"."""
    for low, high, label in HORIZON_BUCKETS:
        if step >= low and (high is None or step <= high):
            return label
    raise ValueError(f"step must be >= {HORIZON_BUCKETS[0][0]}, got {step}")


def _horizon_labels(steps: pd.Series) -> pd.Categorical:
    """Bucket labels of steps [N] as an ordered categorical (buckets sort by horizon)."""
    values = np.asarray(steps, dtype=np.int64)
    if len(values) and values.min() < HORIZON_BUCKETS[0][0]:
        raise ValueError(f"step must be >= {HORIZON_BUCKETS[0][0]}, got {int(values.min())}")
    codes = np.zeros(len(values), dtype=np.int64)
    for i, (low, _, _) in enumerate(HORIZON_BUCKETS):
        codes[values >= low] = i
    return pd.Categorical.from_codes(codes, categories=list(_BUCKET_LABELS), ordered=True)


def _row_scores(matched: pd.DataFrame) -> pd.DataFrame:
    """Per-candle terms [N]: |e|, |p|, direction hit (NaN when A == L), crps, covered."""
    actual = matched["actual_close"].to_numpy(dtype=np.float64)
    last = matched["last_close"].to_numpy(dtype=np.float64)
    mean = matched["mean_close"].to_numpy(dtype=np.float64)
    scale = np.abs(last)
    scale = np.where(scale > 0, scale, np.nan)  # L == 0: no relative error
    quantiles = np.stack([matched[level_column(level)].to_numpy(dtype=np.float64) for level in LIVE_LEVELS], axis=1)
    taus = np.asarray(LIVE_LEVELS, dtype=np.float64)
    u = actual[:, None] - quantiles  # [N, levels]
    pinball = np.maximum(taus * u, (taus - 1.0) * u)
    moved = actual != last
    hit = np.where(moved, np.sign(mean - last) == np.sign(actual - last), False).astype(np.float64)
    hit[~moved] = np.nan
    low, high = (matched[level_column(level)].to_numpy(dtype=np.float64) for level in BAND)
    return pd.DataFrame(
        {
            "abs_e": np.abs(actual - mean) / scale,
            "abs_p": np.abs(actual - last) / scale,
            "hit": hit,
            "crps": 2.0 * pinball.mean(axis=1) / scale,
            "covered": ((low <= actual) & (actual <= high)).astype(np.float64),
        },
        index=matched.index,
    )


def accuracy_table(matched: pd.DataFrame, by: Sequence[str] = ("role", "model_version", "horizon")) -> pd.DataFrame:
    """Metrics (see the module docstring) per group of matched forecast candles.

    matched: `LiveStore.matched()` rows (at least step, last_close, mean_close,
    actual_close, the quantile columns, and the `by` columns). `by` names columns of
    `matched`, or "horizon" for the step's bucket label. Returns one row per group, columns
    *by then METRICS, sorted by the `by` columns (horizon buckets in horizon order), with a
    fresh 0..n-1 index; an empty frame with those columns when nothing matched.
    """
    by = list(by)
    missing = [c for c in (*_NEEDED, *(b for b in by if b != "horizon")) if c not in matched.columns]
    if missing:
        raise ValueError(f"matched frame lacks columns {missing}")
    if not by:
        raise ValueError("by must name at least one column")
    if len(matched) == 0:
        empty = pd.DataFrame({name: pd.Series(dtype=object) for name in by})
        for metric in METRICS:
            empty[metric] = pd.Series(dtype="int64" if metric == "forecasts" else "float64")
        return empty
    scores = _row_scores(matched)
    for name in by:
        scores[name] = _horizon_labels(matched["step"]) if name == "horizon" else matched[name]
    groups = scores.groupby(by, sort=True, observed=True, dropna=False)
    sums = groups[["abs_e", "abs_p"]].sum(min_count=1)
    table = pd.DataFrame(
        {
            "forecasts": groups.size().astype("int64"),
            "mae": groups["abs_e"].mean(),
            "mase": sums["abs_e"] / sums["abs_p"].where(sums["abs_p"] > 0),
            "directional_accuracy": groups["hit"].mean(),
            "crps": groups["crps"].mean(),
            "coverage": groups["covered"].mean(),
        }
    ).reset_index()
    if "horizon" in by:
        table["horizon"] = table["horizon"].astype(str)
    return table[[*by, *METRICS]]


PAIR_KEYS = ("request_id", "series_id", "timestamp")


def paired_accuracy(matched: pd.DataFrame, champion: str, challenger: str) -> pd.DataFrame:
    """The metrics of two model versions on the forecast candles both answered: the same
    request (a shadow copy keeps the request id), series and timestamp. One row per
    version (`model_version`, then METRICS), champion first; rows with 0 forecasts when the
    two share nothing. A version's duplicate answers to one key count once (the latest)."""
    versions = matched["model_version"].astype(str)
    sides = []
    for version in (str(champion), str(challenger)):
        side = matched[versions == version].drop_duplicates(list(PAIR_KEYS), keep="last")
        sides.append(side.set_index(list(PAIR_KEYS)))
    shared = sides[0].index.intersection(sides[1].index)
    rows = []
    for version, side in zip((str(champion), str(challenger)), sides, strict=True):
        paired = side.loc[shared].reset_index()
        table = accuracy_table(paired.assign(model_version=version), by=("model_version",))
        if table.empty:
            table = pd.DataFrame([{"model_version": version, "forecasts": 0, **dict.fromkeys(METRICS[1:], np.nan)}])
        rows.append(table)
    return pd.concat(rows, ignore_index=True)[["model_version", *METRICS]]
