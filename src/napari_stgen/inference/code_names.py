"""Suggested region names for GenST's gene codes, from a pathologist's labels they co-occur with.

``stgen evaluate codes --update-card`` stores, in the GenST card under
``codebook.pathology.code_labels``, how often each gene code (assigned from *measured*
expression) falls on each pathologist region of the labelled HER2ST sections. A code is given a
suggested name when one region holds most of its spots and is enriched over that region's share
of all labelled spots; the name is a suggestion, shown with its share, its support and its lift.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

#: A suggestion needs this share of the code's spots, this many spots and this enrichment.
MIN_SHARE = 0.5
MIN_SPOTS = 5
MIN_LIFT = 1.25


class Suggestion(NamedTuple):
    """A suggested region name for a code, with its evidence."""

    label: str  # the pathologist's region label
    share: float  # of the code's labelled spots that carry it
    spots: int  # labelled spots of the code
    lift: float  # share over the label's share of all labelled spots

    def __str__(self) -> str:
        return (
            f"{self.label} ({self.share:.0%} of {self.spots} spots, {self.lift:.1f}× base rate)"
        )


def suggestions(
    code_labels: Mapping[str | int, Mapping[str, int]],
    min_share: float = MIN_SHARE,
    min_spots: int = MIN_SPOTS,
    min_lift: float = MIN_LIFT,
) -> dict[int, Suggestion]:
    """A suggestion per code: its most frequent pathologist label when that label holds
    ≥ ``min_share`` of the code's ≥ ``min_spots`` labelled spots and is ≥ ``min_lift`` times
    its share of all labelled spots (codes without one are left out)."""
    base: Counter = Counter()
    for counts in code_labels.values():
        base.update(counts)
    n_all = max(sum(base.values()), 1)
    out = {}
    for c, counts in code_labels.items():
        total = sum(counts.values())
        if total < min_spots:
            continue
        label, n = max(counts.items(), key=lambda kv: kv[1])
        share = n / total
        lift = share / (base[label] / n_all)
        if share >= min_share and lift >= min_lift:
            out[int(c)] = Suggestion(label, share, total, lift)
    return out


def suggest_names(code_labels: Mapping[str | int, Mapping[str, int]]) -> dict[int, str]:
    """:func:`suggestions` as text, e.g. ``'immune infiltrate (72% of 113 spots, 7.5× base
    rate)'``."""
    return {c: str(s) for c, s in suggestions(code_labels).items()}


def card_suggestions(card: Mapping) -> tuple[dict[int, Suggestion], str]:
    """(suggestion per code, where they come from) from a GenST card; empty when the card
    carries no pathology table (``stgen evaluate codes --update-card`` writes it)."""
    path = (card.get("codebook") or {}).get("pathology")
    if not isinstance(path, Mapping) or not path.get("code_labels"):
        return {}, ""
    sections = ", ".join(path.get("sections", []))
    return suggestions(path["code_labels"]), f"pathologist regions of HER2ST {sections}"
