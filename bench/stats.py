"""Figures (median of several runs, with min and max), ratios, and the printed table.

A `Figure` keeps every sample, so the JSON report carries the raw runs and the table
shows the median with its spread. Ratios are taken between medians of figures measured
in the same run of the harness: on a shared 2-core machine absolute numbers drift with
whatever else is running, ratios much less so.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Figure:
    """One measured quantity: its samples (one per run), unit and whether more is better."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    note: str = ""

    def add(self, value: float) -> None:
        self.samples.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def low(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def high(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "samples": self.samples,
            "note": self.note,
        }


def ratio(ours: Figure | None, base: Figure | None) -> float | None:
    """ours / base by medians, or None when either is missing or empty."""
    if ours is None or base is None or not ours.samples or not base.samples or base.median == 0:
        return None
    return ours.median / base.median


@dataclass
class Row:
    """One line of the table: a figure, and optionally what it is compared to."""

    scenario: str
    figure: Figure
    base: Figure | None = None
    base_label: str = ""

    @property
    def ratio(self) -> float | None:
        return ratio(self.figure, self.base)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "figure": self.figure.as_dict(),
            "compared_to": None if self.base is None else self.base.name,
            "compared_label": self.base_label,
            "ratio": self.ratio,
        }


@dataclass
class Target:
    """A target of issue 5: a ratio (or a value) and the bound it must meet."""

    name: str
    value: float | None
    bound: float
    at_most: bool = False
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "bound": self.bound,
            "at_most": self.at_most,
            "unit": self.unit,
            "met": self.met,
        }


def fmt(value: float | None, unit: str = "") -> str:
    """A number with as many digits as it deserves."""
    if value is None or value != value:  # None or NaN
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def render_table(rows: list[Row], targets: list[Target]) -> str:
    """The human table: one block per scenario; each figure's median [min - max], and
    the figure it is compared to with the ratio of the medians."""
    header = ("figure", "median", "min - max", "unit", "ratio", "vs")
    cells: list[tuple[str, ...] | str] = []
    current = None
    for row in rows:
        if row.scenario != current:
            current = row.scenario
            cells.append(row.scenario)
        fig = row.figure
        cells.append(
            (
                "  " + fig.name,
                fmt(fig.median),
                f"{fmt(fig.low)} - {fmt(fig.high)}",
                fig.unit,
                f"{fmt(row.ratio)}x" if row.ratio is not None else "",
                row.base_label if row.base is not None else "",
            )
        )
    lines = [header, *(c for c in cells if isinstance(c, tuple))]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(
            v.ljust(widths[i]) if i in (0, 3, 5) else v.rjust(widths[i])
            for i, v in enumerate(values)
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    for cell in cells:
        out.append(cell if isinstance(cell, str) else line(cell))
    if targets:
        out.append("")
        out.append("targets (issue 5)")
        for t in targets:
            sign = "<=" if t.at_most else ">="
            verdict = {True: "met", False: "NOT MET", None: "not measured"}[t.met]
            out.append(
                f"  {t.name}: {fmt(t.value)}{t.unit} (want {sign} {fmt(t.bound)}{t.unit}) {verdict}"
            )
    return "\n".join(out)
