"""The paper's figures from the result tables (matplotlib, no display needed).

Each function writes its file and returns the (closed) matplotlib Figure, so that
callers and tests can read what was drawn.
"""

from __future__ import annotations

import numpy as np

# One colour per method, the same in every figure.
COLOURS = {
    "baseline": "#444444",
    "logreg": "#999999",
    "scarf": "#1f77b4",
    "vime": "#2ca02c",
    "byol": "#d62728",
}
# References (no pre-training) get their own style, never a method's colour.
REFERENCE_STYLE = {"color": "#888888", "linestyle": "--"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def _log_fraction_axis(ax) -> None:
    """A log x axis labelled with plain fractions (0.02, 0.1, ...), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])


def _finish(fig, ax, path: str, title: str):
    """Title, grid and legend, then the file (atomically); the figure is closed."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    _pyplot().close(fig)
    return fig


def _save(fig, path: str) -> None:
    from keras_ssrl.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def label_efficiency(frame, path: str, title: str = ""):
    """Figure 3: mean test accuracy vs label fraction p, a band of +-1 std over
    repeats, one panel per mode; the baseline and logistic regression in every panel."""
    plt = _pyplot()
    modes = [m for m in ("frozen", "unfrozen") if m in set(frame["mode"])] or ["none"]
    fig, axes = plt.subplots(
        1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False
    )
    for ax, mode in zip(axes[0], modes):
        shown = frame[(frame["mode"] == mode) | (frame["mode"] == "none")]
        for method, group in shown.groupby("method", sort=True):
            stats = group.groupby("p")["accuracy"].agg(["mean", "std"]).sort_index()
            p = stats.index.to_numpy(dtype=float)
            mean, std = stats["mean"].to_numpy(), np.nan_to_num(stats["std"].to_numpy())
            colour = COLOURS.get(method)
            style = "--" if method in ("baseline", "logreg") else "-"
            ax.plot(p, mean, style, marker="o", ms=3, color=colour, label=method)
            ax.fill_between(p, mean - std, mean + std, color=colour, alpha=0.15)
        _log_fraction_axis(ax)
        ax.set_xlabel("fraction of labelled fine-tuning data (p)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title}: {mode}" if title else mode)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return fig


def architectures(gains, path: str, title: str = ""):
    """Figure 4 (top): AUPC gain over the baseline vs depth, per method and width."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = gains[gains["method"].isin(["scarf", "vime", "byol"])].copy()
    rows["depth"] = rows["architecture"].str.split("x").str[0].astype(int)
    rows["width"] = rows["architecture"].str.split("x").str[1].astype(int)
    for (method, width), group in rows.groupby(["method", "width"], sort=True):
        group = group.sort_values("depth")
        style = "-" if width == rows["width"].min() else "--"
        ax.errorbar(
            group["depth"],
            group["gain_vs_baseline"],
            yerr=[
                group["gain_vs_baseline"] - group["ci_low"],
                group["ci_high"] - group["gain_vs_baseline"],
            ],
            fmt=style + "o",
            ms=3,
            capsize=2,
            color=COLOURS.get(method),
            label=f"{method} width {width}",
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("encoder depth (layers)")
    ax.set_ylabel("AUPC gain over the baseline (normalised)")
    return _finish(fig, ax, path, title)


def spectrum(
    spectra: dict,
    path: str,
    title: str = "",
    *,
    reference: str | None = None,
    threshold: float | None = None,
):
    """Figure 4 (bottom): sorted singular values of the embedding covariance, log.

    Each spectrum is divided by its largest value, so that the collapse threshold
    (relative to the largest, `keras_ssrl.metrics.COLLAPSE_THRESHOLD`) is one line
    for every run. The run named `reference` (the random-init encoder) is drawn in
    `REFERENCE_STYLE`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, values in spectra.items():
        values = np.asarray(values, dtype=float)
        largest = values.max() if values.size and values.max() > 0 else 1.0
        values = np.maximum(values / largest, 1e-30)
        style = (
            REFERENCE_STYLE
            if name == reference
            else {"color": COLOURS.get(name.split("-")[0])}
        )
        ax.plot(np.arange(1, len(values) + 1), values, label=name, **style)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle=":", lw=1,
                   label=f"collapse threshold ({threshold:g} x largest)")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("singular value rank")
    ax.set_ylabel("singular value / largest (embedding covariance)")
    return _finish(fig, ax, path, title)


def pretrain_size(table, path: str, title: str = ""):
    """Figure 5: test accuracy at p = 0.1 vs the pre-training fraction q, with the
    baseline (no pre-training) as a horizontal band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, group in table.groupby("method", sort=True):
        group = group.sort_values("q")
        mean = group["accuracy"].to_numpy()
        std = np.nan_to_num(group["accuracy_std"].to_numpy())
        colour = COLOURS.get(method)
        if method in ("baseline", "logreg"):
            ax.axhline(mean[0], ls="--", color=colour, label=method)
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=colour, alpha=0.1)
            continue
        q = group["q"].to_numpy(dtype=float)
        ax.plot(q, mean, "-o", ms=3, color=colour, label=method)
        ax.fill_between(q, mean - std, mean + std, color=colour, alpha=0.15)
    _log_fraction_axis(ax)
    ax.set_xlabel("fraction of the pre-training set (q)")
    ax.set_ylabel("test accuracy (unfrozen, p = 0.1)")
    return _finish(fig, ax, path, title)
