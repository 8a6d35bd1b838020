"""Area under the performance curve (AUPC) and its gain, with a paired bootstrap.

docs/protocol.md, "Label efficiency and AUPC" (eq. 3): AUPC(m) is the trapezoidal
integral of method m's mean accuracy curve over the label fraction p in [0.02, 0.3];
g(m1, m2) = AUPC(m1) - AUPC(m2), positive when m1 is better on average. The
interval-normalised values AUPC / (0.3 - 0.02) and g / (0.3 - 0.02) read as a mean
accuracy and a difference of mean accuracies. The confidence interval resamples
repeats, paired: repeat r of (p, m1) and of (p, m2) were trained on the same subset, so
they are drawn together.
"""

from __future__ import annotations

import numpy as np

from keras_ssrl.config import AUPC_RANGE


def _in_range(fractions, low: float, high: float) -> np.ndarray:
    fractions = np.asarray(fractions, dtype=np.float64)
    keep = (fractions >= low - 1e-9) & (fractions <= high + 1e-9)
    if keep.sum() < 2:
        raise ValueError(
            f"AUPC over [{low}, {high}] needs at least two fractions in that interval; "
            f"got {sorted(fractions.tolist())}"
        )
    return keep


def span_gap(
    fractions, low: float = AUPC_RANGE[0], high: float = AUPC_RANGE[1]
) -> str | None:
    """What part of [low, high] a grid leaves out; None when it spans the interval.

    The curve is not extrapolated, so a grid from 0.05 integrates over 0.25 of span
    while the normalised AUPC still divides by 0.28: it is then no mean accuracy.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    inside = fractions[(fractions >= low - 1e-9) & (fractions <= high + 1e-9)]
    if inside.size < 2:
        return None  # refused elsewhere (fewer than two fractions)
    first, last = float(inside.min()), float(inside.max())
    missing = [
        f"[{a:g}, {b:g}]" for a, b in ((low, first), (last, high)) if b - a > 1e-9
    ]
    if not missing:
        return None
    return (
        f"the AUPC grid covers p in [{first:g}, {last:g}], not [{low:g}, {high:g}] "
        f"({' and '.join(missing)} missing): the areas span {last - first:g}, yet the "
        f"normalised values divide by {high - low:g}, so they understate mean "
        "accuracies and are not comparable with a full grid's"
    )


def aupc(fractions, accuracy, low: float = AUPC_RANGE[0], high: float = AUPC_RANGE[1]):
    """Trapezoidal area under a mean accuracy curve over p in [low, high].

    Args:
        fractions: the label fractions p (any order).
        accuracy: mean accuracy at each p.
        low, high: the interval (docs/protocol.md: 0.02 to 0.3). Only fractions inside
            it count; the curve is not extrapolated, so the grid should contain both
            ends.

    Returns:
        The area (a float; divide by `high - low` for a mean accuracy).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    keep = _in_range(fractions, low, high)
    order = np.argsort(fractions[keep])
    p, a = fractions[keep][order], accuracy[keep][order]
    return float(np.sum((p[1:] - p[:-1]) * (a[1:] + a[:-1]) / 2.0))


def aupc_gain(fractions, accuracy_1, accuracy_2, **interval) -> float:
    """g(m1, m2) = AUPC(m1) - AUPC(m2) for two mean accuracy curves on the same p."""
    return aupc(fractions, accuracy_1, **interval) - aupc(
        fractions, accuracy_2, **interval
    )


def paired_bootstrap_gain(
    fractions,
    accuracy_1,
    accuracy_2,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    low: float = AUPC_RANGE[0],
    high: float = AUPC_RANGE[1],
) -> dict:
    """AUPC gain of m1 over m2 with a paired percentile-bootstrap interval.

    Args:
        fractions: shape (P,), the label fractions.
        accuracy_1, accuracy_2: shape (P, R), accuracy of repeat r at fraction p; the
            same (p, r) is the same training subset for both methods (paired).
        n_boot: bootstrap resamples.
        level: the interval's coverage (0.95).
        seed: seed of the resampling.
        low, high: the AUPC interval.

    Returns:
        A dict: `gain` (on the mean curves), `ci_low`, `ci_high`, `n_boot`, `repeats`.
        With a single repeat the interval is undefined (NaN).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    a1 = np.asarray(accuracy_1, dtype=np.float64)
    a2 = np.asarray(accuracy_2, dtype=np.float64)
    if a1.shape != a2.shape or a1.ndim != 2 or a1.shape[0] != fractions.shape[0]:
        raise ValueError(
            f"accuracies must both be (fractions, repeats); got {a1.shape}, {a2.shape} "
            f"for {fractions.shape[0]} fractions"
        )
    keep = _in_range(fractions, low, high)
    p, diff = fractions[keep], (a1 - a2)[keep]
    order = np.argsort(p)
    p, diff = p[order], diff[order]
    gain = aupc(p, diff.mean(axis=1), low, high)
    repeats = diff.shape[1]
    if repeats < 2:
        return {"gain": gain, "ci_low": np.nan, "ci_high": np.nan, "n_boot": 0,
                "repeats": repeats}  # fmt: skip
    rng = np.random.default_rng(seed)
    # Resample repeats independently at each p (different p are different subsets),
    # keeping each (p, r) pair of methods together.
    draws = rng.integers(0, repeats, size=(n_boot, len(p), repeats))
    means = np.take_along_axis(diff[None, :, :], draws, axis=2).mean(axis=2)
    widths = (p[1:] - p[:-1]) / 2.0
    gains = ((means[:, 1:] + means[:, :-1]) * widths).sum(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low_q, high_q = np.percentile(gains, [tail, 100.0 - tail])
    return {
        "gain": gain,
        "ci_low": float(low_q),
        "ci_high": float(high_q),
        "n_boot": int(n_boot),
        "repeats": int(repeats),
    }
