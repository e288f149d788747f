"""What a benchmark scorer returns, whatever the benchmark: the summary (JSON), one row per sample, a printable table
and the figures people compare side by side (drawn as a chart)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


@dataclasses.dataclass
class BenchmarkResult:
    summary: dict[str, Any]  # JSON-able and deterministic: rescoring the same predictions gives the same bytes
    per_sample: list[dict[str, Any]]  # one per scored record, in the order given
    table: str  # for the terminal
    # series -> {group: value}, e.g. {"recall": {"movie_animation": 0.41, ...}, "f1": {...}}: a grouped bar chart
    chart: dict[str, dict[str, float]]


class Scorer(Protocol):
    def score(self, records: list[dict[str, Any]]) -> BenchmarkResult:
        """Score predicted records (the benchmark's annotation format with the prediction written in)."""
        ...


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table; floats with 3 decimals."""
    cells = [[f"{value:.3f}" if isinstance(value, float) else str(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width)
                       in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])
