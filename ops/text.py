"""Figures for people: byte counts as the reports and the CLI print them. One copy, so a
migration's report and `pgsplit migrate status` say the same size the same way."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: float | None) -> str:
    """1536 -> "1.5 kB"; None (not known) -> "-"."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
