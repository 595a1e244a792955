"""``keep_probabilities.png``: each field's stage-1 keep probability, kept vs pruned, with the threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

__all__ = ["plot_keep_probabilities"]


def plot_keep_probabilities(report: pd.DataFrame, path: Path, threshold: Optional[float]) -> None:
    """A horizontal bar per field of ``report`` (``feature_report.csv``: ``field``, ``keep_probability``,
    ``kept``, ``selection``) in the report's order, kept fields in blue, pruned ones in grey; a dashed line at
    ``threshold`` when the fields were kept by it (selection ``lightfmp`` without ``top_k``). Writes a PNG to
    ``path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fields = list(report["field"])[::-1]  # first row on top
    probabilities = list(report["keep_probability"])[::-1]
    kept = list(report["kept"])[::-1]
    colors = ["tab:blue" if k else "lightgray" for k in kept]
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.28 * len(fields)))
    try:
        ax.barh(fields, probabilities, color=colors)
        ax.set_xlim(0, 1)
        ax.set_xlabel("keep probability P(z != 0) after stage 1")
        selection = str(report["selection"].iloc[0]) if "selection" in report and len(report) else "lightfmp"
        handles = [Patch(color="tab:blue", label="kept"), Patch(color="lightgray", label="pruned")]
        if threshold is not None:
            line = ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
            handles.append(line)  # type: ignore[arg-type]  # a Line2D is a valid legend handle
        ax.legend(handles=handles, loc="lower right", fontsize=8)
        ax.set_title(f"Light-FMP fields: {sum(kept)} of {len(kept)} kept (selection: {selection})", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)
