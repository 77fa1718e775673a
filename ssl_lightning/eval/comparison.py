"""A Markdown comparison of methods: one row per method, ``mean ± std`` over seeds of each run's numbers.

Pure helpers (no training, no files): ``benchmarks/compare.py`` runs the trainings and evaluations and hands
each run to ``aggregate``, then ``markdown_table`` and ``image_row`` write the report. A run is its
pretraining wall time and the ``metrics.json`` of ``ssl-lightning eval`` (``results`` maps row names such as
``"knn/k=200"`` or ``"linear"`` to ``{"top1": ..., ...}``). The std is the sample standard deviation
(``n - 1`` in the denominator); a metric that is missing from any seed's ``metrics.json`` reads ``n/a``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

NOT_AVAILABLE = "n/a"


@dataclass(frozen=True)
class Run:
    """One pretraining + evaluation: ``method`` groups runs into a row (runs of a method differ by ``seed``)."""

    method: str
    seed: int
    pretrain_seconds: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Column:
    """A table column: ``results[result][field]`` of each run's ``metrics.json``, aggregated over seeds."""

    header: str
    result: str
    field: str = "top1"


@dataclass(frozen=True)
class Stat:
    """``mean`` and sample ``std`` over ``n`` values (``std`` is None when ``n < 2``)."""

    mean: float
    std: Optional[float]
    n: int


@dataclass
class Row:
    """A method's aggregates: its pretraining time and one ``Stat`` (None: missing) per column header."""

    method: str
    seeds: list[int]
    pretrain_seconds: Stat
    values: dict[str, Optional[Stat]] = field(default_factory=dict)


def mean_std(values: Sequence[float]) -> Stat:
    """Mean and sample standard deviation (``statistics.stdev``, ``n - 1``) of ``values``."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


def metric_value(metrics: dict[str, Any], column: Column) -> Optional[float]:
    """``metrics["results"][column.result][column.field]`` as a float, None when any key is missing."""
    value = metrics.get("results", {}).get(column.result, {}).get(column.field)
    return None if value is None else float(value)


def column_stat(runs: Sequence[Run], column: Column) -> Optional[Stat]:
    """``mean_std`` of ``column`` over ``runs``; None unless every run has the metric."""
    values = [metric_value(run.metrics, column) for run in runs]
    if any(v is None for v in values):
        return None
    return mean_std([v for v in values if v is not None])


def aggregate(runs: Sequence[Run], columns: Sequence[Column]) -> list[Row]:
    """One ``Row`` per method, in the order methods first appear in ``runs``."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    return [
        Row(method, [r.seed for r in group], mean_std([r.pretrain_seconds for r in group]),
            {c.header: column_stat(group, c) for c in columns})
        for method, group in by_method.items()
    ]


def format_stat(stat: Optional[Stat], digits: int = 1) -> str:
    """``"42.1 ± 0.3"``; the mean alone for one seed; ``n/a`` for a missing metric."""
    if stat is None:
        return NOT_AVAILABLE
    text = f"{stat.mean:.{digits}f}"
    return text if stat.std is None else f"{text} ± {stat.std:.{digits}f}"


def format_seconds(seconds: float) -> str:
    """``m:ss`` (rounded to the second): 192.4 -> ``"3:12"``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds must be finite and non-negative, got {seconds}")
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def format_duration(stat: Stat) -> str:
    """``"3:12 ± 0:05"`` (m:ss); the mean alone for one seed."""
    text = format_seconds(stat.mean)
    return text if stat.std is None else f"{text} ± {format_seconds(stat.std)}"


def markdown_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """A Markdown table: method, seeds, pretraining time (m:ss), then one column per ``columns``."""
    headers = ["Method", "Seeds", "Pretraining (m:ss)", *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
    for row in rows:
        cells = [row.method, str(len(row.seeds)), format_duration(row.pretrain_seconds),
                 *(format_stat(row.values[c.header]) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def image_row(images: dict[str, str]) -> str:
    """A one-row Markdown table of images side by side: ``{caption: relative path}``."""
    if not images:
        return ""
    captions, paths = list(images), list(images.values())
    return "\n".join([
        "| " + " | ".join(captions) + " |",
        "|" + ":---:|" * len(captions),
        "| " + " | ".join(f"![{c}]({p})" for c, p in zip(captions, paths)) + " |",
    ]) + "\n"
