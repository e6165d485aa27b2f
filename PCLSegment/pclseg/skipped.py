"""What a folder read could not use, and why: one record per candidate, one line for a panel.

Kept apart from :mod:`pclseg.io` so that the GUI-side logic can word these without importing
SimpleITK.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Skipped:
    """A candidate that could not be used, and why (one line)."""

    path: str
    reason: str


def skipped_note(items: Sequence[Skipped], limit: int = 5) -> str:
    """``"skipped 2 file(s): a.nii.gz (damaged: ...); b.nrrd (...)"``, one line for a panel or
    a page ("" when nothing was skipped); the first ``limit`` are named."""
    if not items:
        return ""
    named = "; ".join(f"{Path(s.path).name} ({s.reason})" for s in items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"skipped {len(items)} file(s): {named}{more}"
