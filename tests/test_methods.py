"""Methods, layers and losses: the science of pre-training, on tiny data."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ssrl.config import PretrainConfig
from keras_ssrl.encoders import build_encoder
from keras_ssrl.layers import MarginalCorruption
from keras_ssrl.layers.corruption import cell_uniforms
from keras_ssrl.losses import byol_loss, ema_decay, info_nce, vime_losses
from keras_ssrl.methods import METHODS, Byol, Scarf, Vime, build_method

# Every test here also runs under KERAS_BACKEND=jax (see .ci/run).
pytestmark = pytest.mark.backends

N_GENES = 24


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(32, N_GENES)).astype("float32")


def small_config(method):
    config = PretrainConfig(method=method)
    config.byol.hidden = 32
    config.byol.projection_dim = 8
    config.scarf.projector_hidden = 16
    config.scarf.projector_dim = 8
    return config


def fit(model, x, steps=3, lr=1e-2):
    model.compile(optimizer=keras.optimizers.Adam(lr))
    rows = np.resize(x, (steps * 16, x.shape[1]))  # `steps` batches of 16, in order
    return model.fit(rows, batch_size=16, epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("method", METHODS)
def test_fit_keeps_losses_finite_and_moves_weights(method, x):
    encoder = build_encoder(N_GENES, layers=2, width=16)
    before = [w.copy() for w in encoder.get_weights()]
    model = build_method(method, encoder, N_GENES, small_config(method), total_steps=3)
    history = fit(model, x)
    for name, values in history.history.items():
        assert np.isfinite(values).all(), name
    moved = [not np.allclose(a, b) for a, b in zip(before, encoder.get_weights())]
    assert all(moved[:2]), "the first Dense layer did not move"
    assert model.evaluate(x, batch_size=16, verbose=0, return_dict=True)["loss"] > 0


def test_marginal_corruption_rate_and_values():
    rng = np.random.default_rng(1)
    # Each feature takes values in its own set, so a replacement can be traced.
    x = (rng.integers(0, 50, size=(128, 400)) + 1000 * np.arange(400)).astype("float32")
    layer = MarginalCorruption(0.3, seed=3)
    corrupted = keras.ops.convert_to_numpy(layer(x))
    changed = corrupted != x
    assert abs(changed.mean() - 0.3 * (1 - 1 / 50)) < 0.01  # equal draws look unchanged
    for j in range(x.shape[1]):
        assert set(corrupted[:, j]) <= set(x[:, j])  # values observed in that feature
    again = keras.ops.convert_to_numpy(layer(x))
    assert not np.array_equal(again, corrupted)  # a fresh mask at every call
    same_seed = keras.ops.convert_to_numpy(MarginalCorruption(0.3, seed=3)(x))
    np.testing.assert_array_equal(same_seed, corrupted)


def uniforms(key, batch=512, features=2048):
    key = keras.ops.convert_to_tensor(np.array(key, dtype="uint32"))
    return keras.ops.convert_to_numpy(cell_uniforms(key, batch, features)).astype(float)


def test_cell_uniforms_are_uniform_and_independent():
    # 1M cells: a correlation's standard error is 0.001, so |r| < 0.005 is 5 sigma.
    u = uniforms([12345, 678])
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=64, range=(0, 1))[0]
    expected = u.size / 64
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)  # 63 degrees of freedom, ~6 sigma
    centred = u - 0.5
    for a, b in [
        (centred[:, 1:], centred[:, :-1]),  # neighbouring features
        (centred[1:], centred[:-1]),  # neighbouring examples
        (centred, uniforms([12345, 679]) - 0.5),  # keys one bit apart
        (centred, uniforms([12344, 678]) - 0.5),
    ]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.005
    # A Bernoulli(0.3) mask: per-feature counts spread as a binomial would.
    per_feature = (u < 0.3).sum(axis=0)
    assert abs(per_feature.mean() / 512 - 0.3) < 0.003
    assert 0.8 < per_feature.var() / (512 * 0.3 * 0.7) < 1.2


def test_cell_uniforms_refuse_batches_whose_counters_would_wrap():
    with pytest.raises(ValueError, match="2\\*\\*32 cells"):
        uniforms([1, 2], batch=2**16 + 1, features=2**16)


def test_corruption_donor_rows_are_uniform():
    # Row i holds the value i in every feature, so a corrupted cell names its donor.
    batch, features = 64, 4096
    x = np.repeat(np.arange(batch, dtype="float32")[:, None], features, axis=1)
    corrupted, mask = (
        keras.ops.convert_to_numpy(t)
        for t in MarginalCorruption(0.3, seed=5, return_mask=True)(x)
    )
    donors = corrupted[mask == 1].astype(int)
    counts = np.bincount(donors, minlength=batch)
    expected = donors.size / batch
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)
    # Donors are drawn per cell: the cells of one example come from many examples.
    assert min(len(set(row[m == 1])) for row, m in zip(corrupted, mask)) > 0.9 * batch


def test_vime_mask_rate_and_loss_components(x):
    layer = MarginalCorruption(0.3, seed=0, return_mask=True)
    big = np.tile(x, (8, 20))
    corrupted, mask = (keras.ops.convert_to_numpy(t) for t in layer(big))
    assert abs(mask.mean() - 0.3) < 0.01
    np.testing.assert_array_equal(corrupted[mask == 0], big[mask == 0])
    model = Vime(build_encoder(N_GENES, layers=2, width=16), mask_rate=0.3, alpha=2.0)
    assert model.mask_decoder.output_shape == (None, N_GENES)
    assert model.decoder_layers == 2 and model.decoder_width == 16
    losses = model.compute_losses(x, training=False)
    np.testing.assert_allclose(
        float(losses["loss"]),
        float(losses["mask_loss"]) + 2.0 * float(losses["feature_loss"]),
        rtol=1e-6,
    )


def test_vime_loss_against_numpy():
    rng = np.random.default_rng(2)
    mask = (rng.random((6, 5)) < 0.3).astype("float32")
    prob = rng.uniform(0.05, 0.95, (6, 5)).astype("float32")
    x, rec = rng.normal(size=(2, 6, 5)).astype("float32")
    total, lm, lf = vime_losses(mask, prob, x, rec, alpha=2.0)
    bce = -(mask * np.log(prob) + (1 - mask) * np.log(1 - prob)).mean()
    mse = ((x - rec) ** 2).mean()
    np.testing.assert_allclose(
        [float(lm), float(lf), float(total)], [bce, mse, bce + 2 * mse], rtol=1e-4
    )


def test_info_nce_against_numpy():
    rng = np.random.default_rng(3)
    a, c = rng.normal(size=(2, 7, 5))
    tau = 0.5
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    logits = an @ cn.T / tau
    expected = np.mean(-np.diag(logits) + np.log(np.exp(logits).sum(axis=1)))
    np.testing.assert_allclose(float(info_nce(a, c, tau)), expected, rtol=1e-5)
    # Candidates from a global batch: this replica's rows start at `offset`.
    others = rng.normal(size=(7, 5))
    glob = np.concatenate([others, c])
    gn = glob / np.linalg.norm(glob, axis=1, keepdims=True)
    logits = an @ gn.T / tau
    expected = np.mean(
        -logits[np.arange(7), np.arange(7) + 7] + np.log(np.exp(logits).sum(axis=1))
    )
    np.testing.assert_allclose(
        float(info_nce(a, glob, tau, offset=7)), expected, rtol=1e-5
    )


def test_byol_loss_against_numpy():
    rng = np.random.default_rng(4)
    p, z = rng.normal(size=(2, 9, 4))
    cos = (p * z).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
    np.testing.assert_allclose(float(byol_loss(p, z)), np.mean(2 - 2 * cos), rtol=1e-5)
    assert float(byol_loss(p, 3 * p)) == pytest.approx(0.0, abs=1e-6)


def test_ema_schedule():
    assert float(ema_decay(0, 100, 0.99)) == pytest.approx(0.99)
    assert float(ema_decay(100, 100, 0.99)) == pytest.approx(1.0)
    assert float(ema_decay(50, 100, 0.99)) == pytest.approx(0.995)
    values = [float(ema_decay(k, 100, 0.99)) for k in range(0, 101, 10)]
    assert values == sorted(values)
    assert float(ema_decay(70, 100, 0.9, "constant")) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        ema_decay(0, 10, 0.9, "linear")


def test_byol_target_is_exact_ema_and_gets_no_gradient(x):
    model = build_method(
        "byol",
        build_encoder(N_GENES, layers=2, width=16),
        N_GENES,
        small_config("byol"),
        total_steps=10,
    )

    def online():
        weights = model.encoder.weights + model.projector.weights
        return [w.numpy().copy() for w in weights]

    def target():
        weights = model.target_encoder.weights + model.target_projector.weights
        return [w.numpy().copy() for w in weights]

    for a, b in zip(online(), target()):
        np.testing.assert_array_equal(a, b)  # the target starts as an exact copy
    target_ids = {
        id(v) for v in model.target_encoder.weights + model.target_projector.weights
    }
    assert not target_ids & {id(v) for v in model.trainable_variables}
    if keras.backend.backend() == "tensorflow":
        with tf.GradientTape() as tape:
            loss = model.compute_losses(x, training=True)["loss"]
        grads = tape.gradient(loss, model.target_encoder.weights)
        assert all(g is None for g in grads)
    # Under JAX gradients are taken of the trainable variables only (checked above);
    # the update below runs inside the compiled step, as `fit` compiles it.

    xi_before = target()
    fit(model, x[:16], steps=1)
    decay = 1 - (1 - 0.99) * (math.cos(0.0) + 1) / 2  # step 0 of the schedule
    assert float(model.decay) == pytest.approx(decay)
    for xi_new, xi_old, theta in zip(target(), xi_before, online()):
        np.testing.assert_allclose(
            xi_new, decay * xi_old + (1 - decay) * theta, rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_mixed_precision_runs_finite(policy, method, x):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        encoder = build_encoder(N_GENES, layers=2, width=16)
        model = build_method(
            method, encoder, N_GENES, small_config(method), total_steps=3
        )
        history = fit(model, x, steps=2)
        assert all(np.isfinite(v).all() for v in history.history.values())
        assert encoder.layers[1].compute_dtype != "float32"
        assert all(w.dtype == "float32" for w in encoder.weights)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_encoder_save_load_round_trip(tmp_path, x):
    encoder = build_encoder(N_GENES, layers=2, width=16, dropout=0.1)
    fit(build_method("scarf", encoder, N_GENES, small_config("scarf")), x)
    path = tmp_path / "encoder.keras"
    encoder.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(encoder(x, training=False)),
        keras.ops.convert_to_numpy(loaded(x, training=False)),
    )


@pytest.mark.parametrize("cls", [Scarf, Vime, Byol])
def test_methods_serialise_and_reload(cls, tmp_path, x):
    model = cls(build_encoder(N_GENES, layers=1, width=8), seed=5)
    config = model.get_config()
    assert cls.from_config(config).get_config() == config
    fit(model, x, steps=1)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded) is cls
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_corruption_extreme_rates(rate, x):
    corrupted, mask = (
        keras.ops.convert_to_numpy(t)
        for t in MarginalCorruption(rate, seed=0, return_mask=True)(x)
    )
    assert mask.mean() == rate
    if rate == 0.0:
        np.testing.assert_array_equal(corrupted, x)
    for j in range(x.shape[1]):  # every value still comes from its own feature
        assert set(corrupted[:, j]) <= set(x[:, j])
