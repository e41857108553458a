"""Plain-text tables for people: model reports, bundles and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_ms", "format_size", "text_table"]


def format_size(size: int) -> str:
    """Bytes in the largest unit that keeps the number at least 1 (``4.51 MB``, ``812 B``)."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


def format_ms(value: float | None) -> str:
    """Milliseconds with three decimals, or ``-`` when not measured."""
    return "-" if value is None else f"{value:.3f}"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join(line(r) for r in (header, *rows))
