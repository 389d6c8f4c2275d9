"""Figures of a run: ``python -m utils.plot RUN_DIR [--out fig] [--name NAME]``.

Writes ``<out>/<name>_curves.png`` (val Dice per client per round, the warm-up shaded, the loss
terms per party and, where the run logged them, a second row of pseudo-label diagnostics per party:
the ``diag_*`` terms of :mod:`fed.common.diag`, SA confidence dashed against its accuracy) and
``<out>/<name>_predictions.png`` (test overlays written by the test protocol: prediction filled red,
ground-truth contour green).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.logger import read_metrics  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(records, out: Path, title: str) -> Path:
    rounds = [r["round"] for r in records]
    warm = [r["round"] for r in records if r.get("warmup")]
    parties = sorted({p for r in records for p in r["loss"]}, key=lambda p: (p != "server", p))
    groups = [g for g in records[-1]["val"]]
    ncols = 1 + len(parties)
    diags = {p: sorted({t for r in records for t in r["loss"].get(p, {}) if t.startswith("diag_")})
             for p in parties}
    nrows = 2 if any(diags.values()) else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    ax = axes[0, 0]
    for g in groups:
        ys = [r["val"].get(g, {}).get("dice", np.nan) for r in records]
        ax.plot(rounds, ys, marker="o", ms=3, lw=2.2 if g == "all" else 1.2, label=g,
                color="k" if g == "all" else None)
    ax.set_title("validation Dice")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    for a in axes.flat:
        if warm:
            a.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.9", zorder=0)
    for ax, party in zip(axes[0, 1:], parties):
        terms = sorted({t for r in records for t in r["loss"].get(party, {})
                        if not t.endswith(("_kept", "_taken")) and not t.startswith("diag_")})
        for t in terms:
            ax.plot(rounds, [r["loss"].get(party, {}).get(t, np.nan) for r in records], label=t, lw=1.2)
        ax.set_title(f"{party} losses")
        ax.set_xlabel("round")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    if nrows == 2:
        axes[1, 0].remove()
        for ax, party in zip(axes[1, 1:], parties):
            plot_diagnostics(ax, records, party, diags[party])
    fig.suptitle(f"{title}  (grey: warm-up rounds)", fontsize=10)
    return _save(fig, out / f"{title}_curves.png")


def plot_diagnostics(ax, records, party: str, terms) -> None:
    """One party's ``diag_*`` terms per round on [0, 1]: fractions solid, ``diag_sa_conf`` dashed in
    the colour of ``diag_sa_acc`` (calibration: the two lines meet)."""
    rounds = [r["round"] for r in records]
    series = lambda t: [r["loss"].get(party, {}).get(t, np.nan) for r in records]  # noqa: E731
    for t in terms:
        if t == "diag_sa_conf":
            continue
        line, = ax.plot(rounds, series(t), label=t[5:], lw=1.2, marker="o", ms=2)
        if t == "diag_sa_acc" and "diag_sa_conf" in terms:
            ax.plot(rounds, series("diag_sa_conf"), label="sa_conf", lw=1.2, ls="--", color=line.get_color())
    ax.set_title(f"{party} diagnostics")
    ax.set_xlabel("round")
    ax.set_ylim(-0.02, 1.02)
    if terms:
        ax.legend(fontsize=6)


def plot_predictions(run_dir: Path, out: Path, title: str, per_client: int = 4) -> Path | None:
    import cv2

    files = sorted((run_dir / "test" / "overlays").glob("*.png"))
    if not files:
        return None
    by_group = {}
    for f in files:
        by_group.setdefault(f.name.split("__")[0], []).append(f)
    groups = sorted(by_group)
    fig, axes = plt.subplots(len(groups), per_client, figsize=(2.2 * per_client, 2.3 * len(groups)), squeeze=False)
    for i, g in enumerate(groups):
        for j in range(per_client):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(by_group[g]):
                ax.imshow(cv2.cvtColor(cv2.imread(str(by_group[g][j])), cv2.COLOR_BGR2RGB))
            if j == 0:
                ax.set_title(g, fontsize=8, loc="left")
    fig.suptitle(f"{title}: test predictions (red) and ground truth (green)", fontsize=9)
    return _save(fig, out / f"{title}_predictions.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Plot a run's curves and test predictions.")
    ap.add_argument("run_dir")
    ap.add_argument("--out", default="fig")
    ap.add_argument("--name", help="file name prefix (default: the run folder's name)")
    a = ap.parse_args(argv)
    run = Path(a.run_dir)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or run.name
    records = read_metrics(run)
    if not records:
        raise SystemExit(f"error: {run}/metrics.jsonl has no rounds yet")
    for p in (plot_curves(records, out, name), plot_predictions(run, out, name)):
        if p:
            print(p)


if __name__ == "__main__":
    main()
