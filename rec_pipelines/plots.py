"""Figures for Dagster metadata (inline PNG in Markdown) and MLflow artifacts, drawn
headless with matplotlib."""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tabulate import tabulate

OTHER_LABEL = "other"


def new_figure(width: float = 6.0, height: float = 4.5) -> Figure:
    """An empty figure (inches) on the Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_to_png(figure: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_to_md(figure: Figure, alt: str = "figure", dpi: int = 90) -> str:
    """Markdown that shows the figure: ``![alt](data:image/png;base64,...)``."""
    alt = alt.replace("[", "(").replace("]", ")").replace("\n", " ")
    encoded = base64.b64encode(figure_to_png(figure, dpi=dpi)).decode("ascii")
    return f"![{alt}](data:image/png;base64,{encoded})"


def sample_rows(n_rows: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded sample of at most ``max_rows`` of ``n_rows`` rows."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=max_rows, replace=False))


def pca_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """[n, 2] projection of ``vectors`` on their first two principal components."""
    from sklearn.decomposition import (
        PCA,  # scikit-learn import is slow: only when needed
    )

    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2), dtype=np.float32)
    return PCA(n_components=2, random_state=seed).fit_transform(vectors).astype(np.float32)


def top_labels(labels: Sequence[str], max_labels: int = 10) -> list[str]:
    """``labels`` with all but the ``max_labels - 1`` most frequent replaced by "other"
    (unchanged when there are at most ``max_labels`` distinct labels)."""
    counts = Counter(labels)
    if len(counts) <= max_labels:
        return list(labels)
    keep = {label for label, _ in counts.most_common(max_labels - 1)}
    return [label if label in keep else OTHER_LABEL for label in labels]


def scatter_2d(
    points: np.ndarray,
    labels: Sequence[str],
    title: str = "",
    max_labels: int = 10,
    xlabel: str = "",
    ylabel: str = "",
) -> Figure:
    """A scatter plot of [n, 2] ``points`` coloured by label, with a legend (the most
    frequent ``max_labels - 1`` labels get their own colour, the rest share "other")."""
    points = np.asarray(points, dtype=np.float32)
    grouped = top_labels([str(label) for label in labels], max_labels)
    figure = new_figure()
    axes = figure.add_subplot()
    palette = colormaps["tab10"].colors
    order = sorted(set(grouped), key=lambda label: (label == OTHER_LABEL, -grouped.count(label), label))
    for i, label in enumerate(order):
        rows = np.fromiter((g == label for g in grouped), dtype=bool, count=len(grouped))
        colour = "lightgrey" if label == OTHER_LABEL else palette[i % len(palette)]
        axes.scatter(points[rows, 0], points[rows, 1], s=6, alpha=0.7, color=colour, label=f"{label} ({rows.sum()})",
                     linewidths=0)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if order:
        axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    return figure


def _cell(value: object) -> str:
    """A value as a markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (cells escaped, so titles with "|" stay in their cell)."""
    return tabulate([[_cell(value) for value in row] for row in rows], [_cell(name) for name in header],
                    tablefmt="github", disable_numparse=True)
