"""The final report of a training run: JSON (everything), Markdown (a table) and a plot of the curves."""

from __future__ import annotations

import json
import os

from ..offline import shards

COLUMNS = ("epoch", "train_loss", "train_soft", "train_hard", "val_accuracy", "val_agreement", "val_predictive_kl")


def format_markdown(summary: dict) -> str:
    """The learning curves as a Markdown table, with the best epoch first."""
    best = summary.get("best") or {}
    kept = (f"best validation accuracy {best.get('accuracy', float('nan')):.4f} at epoch {best['epoch']}"
            if best.get("epoch") is not None else "no validation data: the last epoch's weights are kept")
    lines = ["# Distillation report", "",
             f"C = {summary['num_classes']}, S = {summary['n_subclasses']}"
             + (f", subclass weight λ = {summary['subclass_weight']}" if summary.get("n_subclasses", 1) > 1
                and "subclass_weight" in summary else "") + f", epochs run: {summary['epochs_run']}; {kept}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for record in summary["history"]:
        cells = [f"{record[c]:.4f}" if isinstance(record.get(c), float) else str(record.get(c, "")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: str) -> bool:
    """Training loss and validation metrics per epoch; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    history = summary["history"]
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "train_soft", "train_hard"):
        ax1.plot(epochs, [r[key] for r in history], marker="o", label=key)
    for key in ("val_accuracy", "val_agreement"):
        if history and key in history[0]:
            ax2.plot(epochs, [r[key] for r in history], marker="o", label=key)
    ax1.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel="fraction", title="validation")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no validation data: the right panel is empty
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(out_dir: str, summary: dict) -> dict:
    """Writes curves.png, report.md and, last (it marks the stage finished), report.json."""
    if plot_curves(summary, os.path.join(out_dir, "curves.png")):
        summary = {**summary, "plot": "curves.png"}
    shards.write_atomically(os.path.join(out_dir, "report.md"), format_markdown(summary).encode())
    shards.write_atomically(os.path.join(out_dir, "report.json"),
                            (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    return summary
