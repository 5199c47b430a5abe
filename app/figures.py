"""The figures a run logs to MLflow: what people look at before they read numbers.

A retrieval run: Recall@K and NDCG@K for K = 1..100 on its test split. A ranking run: the calibration
curve and the score histogram of positives vs negatives on its test split. ``bench/funnel.py``: its
comparison as a bar chart. Drawn with matplotlib on the Agg backend (no display), imported here only,
when a figure is drawn.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # never a display, also in a worker or under a terminal without one
    import matplotlib.pyplot as plt

    return plt


def at_k_figure(recall: Sequence[float], ndcg: Sequence[float], title: str) -> Any:
    """Recall@K and NDCG@K against K = 1..len(recall)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ks = range(1, len(recall) + 1)
    ax.plot(ks, recall, label="Recall@K")
    ax.plot(ks, ndcg, label="NDCG@K")
    ax.set_xlabel("K (items retrieved from the full corpus)")
    ax.set_ylabel("test split, mean over users")
    ax.set_xlim(1, len(recall))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def calibration_figure(scores: dict[str, list[float]], title: str) -> Any:
    """Observed positive rate against the mean predicted probability of each score bin (the
    ``ScoreHistogram`` of a ranking run's test split), with the diagonal of a calibrated model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 5.0))
    points = [
        (mean, pos / (pos + neg))
        for mean, pos, neg in zip(scores["mean_score"], scores["positives"], scores["negatives"], strict=True)
        if pos + neg > 0 and not math.isnan(mean)
    ]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", label="model")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def score_histogram_figure(scores: dict[str, list[float]], title: str) -> Any:
    """How the predicted probabilities of positives and negatives spread over [0, 1] (each as a share of
    its class, so that a rare class is visible)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    edges = scores["edges"]
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    width = edges[1] - edges[0]
    for key, colour in (("negatives", "tab:blue"), ("positives", "tab:orange")):
        counts = scores[key]
        total = sum(counts) or 1.0
        shares = [c / total for c in counts]
        ax.bar(centres, shares, width=width, alpha=0.5, color=colour, label=f"{key} ({total:,.0f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("share of the class")
    ax.set_xlim(0, 1)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def bar_figure(values: dict[str, float], ylabel: str, title: str) -> Any:
    """One bar per entry, its value written above it (a comparison table as a chart)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(values) + 2), 4.0))
    names = list(values)
    bars = ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        ax.annotate(f"{values[name]:.4f}", top, ha="center", va="bottom")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def close(fig: Any) -> None:
    """Free a drawn figure (pyplot keeps every open figure alive)."""
    _pyplot().close(fig)
