"""Pretext losses as small pure functions, computed in float32.

Under mixed precision the networks run in float16 / bfloat16; the similarities, softmax,
logarithms and reductions below always run in float32, where they do not overflow or
lose the small differences between similarities.
"""

from __future__ import annotations

import math

from keras import ops


def _float32(x):
    return ops.cast(x, "float32")


def l2_normalize(x, axis: int = -1, epsilon: float = 1e-12):
    """x / max(||x||, epsilon) along `axis`, in float32."""
    x = _float32(x)
    norm = ops.sqrt(
        ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), epsilon**2)
    )
    return x / norm


def info_nce(anchors, candidates, temperature: float = 1.0, offset=0):
    """InfoNCE / NT-Xent loss of SCARF (Bahri et al., 2022, eq. 1).

    `L = -1/N sum_i log( exp(s_(i,i+o) / tau) / sum_j exp(s_ij / tau) )`, where
    `s_ij = cos(anchors_i, candidates_j)`: each anchor's positive is the candidate at
    the same position (shifted by `offset`), every other candidate is a negative.

    Args:
        anchors: tensor `(n, d)`, embeddings of the clean views (q(x)).
        candidates: tensor `(m, d)`, embeddings of the corrupted views (q(x~)); with
            several replicas, the corrupted views of the whole global batch, so that
            negatives come from the global batch.
        temperature: float, tau (SCARF default 1.0).
        offset: int or scalar tensor, position of anchor 0's positive in `candidates`
            (replica id x per-replica batch under data parallelism).

    Returns:
        Scalar float32 loss, the mean over anchors.

    Reference:
        Bahri, Jiang, Tay, Metzler. SCARF: Self-Supervised Contrastive Learning using
        Random Feature Corruption. ICLR 2022.
    """
    a = l2_normalize(anchors)
    c = l2_normalize(candidates)
    logits = ops.matmul(a, ops.transpose(c)) / temperature
    labels = ops.arange(ops.shape(a)[0]) + offset
    losses = ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return ops.mean(losses)


def byol_loss(predictions, targets):
    """BYOL's regression loss (Grill et al., 2020, eq. 2): mean of `2 - 2 cos(p, z)`.

    Args:
        predictions: tensor `(n, d)`, online predictions q_theta(z_theta).
        targets: tensor `(n, d)`, target projections z~_xi (no gradient flows into
            them: the caller stops it).

    Returns:
        Scalar float32 loss in [0, 4].
    """
    cosine = ops.sum(l2_normalize(predictions) * l2_normalize(targets), axis=-1)
    return ops.mean(2.0 - 2.0 * cosine)


def vime_losses(mask, mask_probabilities, x, reconstruction, alpha: float = 2.0):
    """VIME self-supervised loss (Yoon et al., 2020): `L = L_m + alpha * L_f`.

    Args:
        mask: tensor `(n, genes)` of 0/1, which features were replaced.
        mask_probabilities: tensor `(n, genes)`, the mask decoder's sigmoid output.
        x: tensor `(n, genes)`, the original (standardised) features.
        reconstruction: tensor `(n, genes)`, the feature decoder's output.
        alpha: float, weight of the feature loss (VIME default 2.0).

    Returns:
        `(total, mask_loss, feature_loss)`, scalar float32 tensors: binary cross-entropy
        of the mask estimate and mean squared error of the reconstruction.
    """
    mask_loss = ops.mean(
        ops.binary_crossentropy(_float32(mask), _float32(mask_probabilities))
    )
    feature_loss = ops.mean(ops.square(_float32(x) - _float32(reconstruction)))
    return mask_loss + alpha * feature_loss, mask_loss, feature_loss


def ema_decay(step, total_steps: int, base: float = 0.99, schedule: str = "cosine"):
    """BYOL's target decay at `step`: `1 - (1 - base) (cos(pi k / K) + 1) / 2`.

    Rises from `base` at step 0 to 1 at `total_steps` (Grill et al., 2020, section 3.2);
    `schedule="constant"` keeps `base`. Works on Python numbers and tensors.
    """
    if schedule == "constant":
        return ops.cast(base, "float32") + 0.0 * ops.cast(step, "float32")
    if schedule != "cosine":
        raise ValueError(f"ema schedule must be cosine or constant, got {schedule!r}")
    progress = ops.minimum(ops.cast(step, "float32") / max(int(total_steps), 1), 1.0)
    return 1.0 - (1.0 - base) * (ops.cos(math.pi * progress) + 1.0) / 2.0
