"""Checks the NumPy oracle in tests/reference.py against the real Keras layers of both flavours."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tensorflow as tf

import reference as ref
from conftest import masked_output

# Keras runs in float32, the oracle in float64; a few float32 roundings over <= 6 steps stay far below this.
ATOL = RTOL = 1e-5


@pytest.fixture
def flavour(flavour) -> str:
    """conftest's flavour fixture (both flavours, fresh session), reduced to its name."""
    return flavour.name


def kmod(flavour: str):
    return importlib.import_module("keras" if flavour == "keras3" else "tf_keras")


def rand(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.uniform(-1.0, 1.0, size=shape) * scale).astype(np.float32)


def close(actual, expected, what: str) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=ATOL, rtol=RTOL, err_msg=what)


def make_layer(flavour: str, cls: str, units, x: np.ndarray, rng: np.random.Generator, *, use_bias=True, **kwargs):
    """Build a Keras recurrent layer on ``x`` and give it random weights (biases included, unlike the defaults)."""
    layer = getattr(kmod(flavour).layers, cls)(
        units, return_sequences=True, return_state=True, use_bias=use_bias, **kwargs
    )
    layer(tf.constant(x))
    layer.set_weights([rand(rng, w.shape, 0.9) for w in layer.get_weights()])
    return layer


def run_layer(layer, x: np.ndarray, mask=None, initial_state=None) -> list[np.ndarray]:
    """Call the layer eagerly; returns [sequence output, *final states] as float64 arrays."""
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = tf.constant(mask)
    if initial_state is not None:
        # tf-keras insists on tensors (not NumPy arrays) for initial_state.
        kwargs["initial_state"] = [tf.constant(s) for s in initial_state]
    return [np.asarray(t, np.float64) for t in layer(tf.constant(x), **kwargs)]


def weights(layer) -> list[np.ndarray]:
    w = layer.get_weights()
    return w if len(w) == 3 else [*w, None]


def check_state_sequences(layer, x, mask, initial_state, go_backwards, expected: dict, names) -> None:
    """The state after t processing steps is the final state of Keras on the first t processed steps.

    This makes every exposed state sequence (masked steps included) observable from Keras itself.
    """
    time = x.shape[1]
    for t in range(1, time + 1):
        sl = slice(time - t, time) if go_backwards else slice(0, t)
        finals = run_layer(layer, x[:, sl], None if mask is None else mask[:, sl], initial_state)[1:]
        for name, final in zip(names, finals):
            close(final, expected[name][:, t - 1], f"{name} after {t} processing steps")


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------


def test_activations_match_keras(flavour):
    K = kmod(flavour)
    grid = np.linspace(-7.0, 7.0, 57, dtype=np.float32).reshape(3, 19)
    for name in ref.ACTIVATIONS[flavour]:
        expected = np.asarray(K.activations.get(name)(tf.constant(grid)), np.float64)
        close(ref.get_activation(name, flavour)(grid), expected, name)


def test_activation_names_follow_the_flavour(flavour):
    K = kmod(flavour)
    for name in ref.ACTIVATIONS["keras3"]:
        if name not in ref.ACTIVATIONS[flavour]:
            with pytest.raises(ValueError):
                K.activations.get(name)
            with pytest.raises(ValueError, match=name):
                ref.get_activation(name, flavour)
    with pytest.raises(ValueError, match="no_such_fn"):
        ref.get_activation("no_such_fn", flavour)
    # The two flavours disagree on hard_sigmoid: 0.2x + 0.5 against x / 6 + 0.5.
    value = float(ref.get_activation("hard_sigmoid", flavour)(np.array(1.0)))
    assert value == pytest.approx(0.7 if flavour == "tfkeras" else 4.0 / 6.0)


# ----------------------------------------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------------------------------------

LSTM_CASES = {
    "plain": {},
    "hard_sigmoid_backwards": {"recurrent_activation": "hard_sigmoid", "go_backwards": True},
    "relu_no_bias_init": {"activation": "relu", "use_bias": False, "init": True},
    "gelu_softsign": {"activation": "gelu", "recurrent_activation": "softsign"},
    "hard_sigmoid_both_init_backwards": {
        "activation": "hard_sigmoid",
        "recurrent_activation": "hard_sigmoid",
        "go_backwards": True,
        "init": True,
    },
}


@pytest.mark.parametrize("case", list(LSTM_CASES))
def test_lstm_unmasked(flavour, case):
    cfg = dict(LSTM_CASES[case])
    init = cfg.pop("init", False)
    rng = np.random.default_rng(1)
    batch, time, feat, units = 2, 5, 3, 4
    x = rand(rng, (batch, time, feat), 2.0)
    layer = make_layer(flavour, "LSTM", units, x, rng, **cfg)
    h0c0 = [rand(rng, (batch, units)), rand(rng, (batch, units))] if init else None
    seq, h, c = run_layer(layer, x, initial_state=h0c0)
    cfg.pop("use_bias", None)
    r = ref.lstm(x, *weights(layer), initial_state=h0c0, flavour=flavour, **cfg)

    close(seq, r["output"], "output")
    close(h, r["last_h"], "last_h")
    close(c, r["last_c"], "last_c")
    close(r["h"], r["output"], "h sequence equals the output when nothing is masked")
    check_state_sequences(layer, x, None, h0c0, cfg.get("go_backwards", False), r, ["h", "c"])

    # The gates are tied to Keras' own h and c sequences by the cell equations; a gate under the wrong key fails.
    act = ref.get_activation(cfg.get("activation", "tanh"), flavour)
    c_prev = np.concatenate([np.zeros((batch, 1, units)) if h0c0 is None else h0c0[1][:, None], r["c"][:, :-1]], 1)
    close(r["f"] * c_prev + r["i"] * r["g"], r["c"], "c = f * c_prev + i * g")
    close(r["o"] * act(r["c"]), seq, "h = o * act(c)")


@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("zero_output", [False, True])
def test_lstm_masked(flavour, backwards, zero_output):
    rng = np.random.default_rng(2)
    batch, time, feat, units = 3, 6, 3, 4
    x = rand(rng, (batch, time, feat), 2.0)
    # Right padding, left padding with a hole, and a fully masked row.
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=bool)
    h0c0 = [rand(rng, (batch, units)), rand(rng, (batch, units))]
    layer = make_layer(
        flavour, "LSTM", units, x, rng, go_backwards=backwards, zero_output_for_mask=zero_output,
        recurrent_activation="hard_sigmoid",
    )
    seq, h, c = run_layer(layer, x, mask, h0c0)
    r = ref.lstm(
        x, *weights(layer), mask=mask, go_backwards=backwards, initial_state=h0c0,
        recurrent_activation="hard_sigmoid", flavour=flavour, masked_output=masked_output(flavour), zero_output_for_mask=zero_output,
    )
    close(seq, r["output"], "output")
    close(h, r["last_h"], "last_h")
    close(c, r["last_c"], "last_c")
    close(r["mask"], mask[:, ::-1] if backwards else mask, "mask in processing order")
    check_state_sequences(layer, x, mask, h0c0, backwards, r, ["h", "c"])

    # The fully masked row keeps its initial state and its gates stay zero.
    close(r["h"][2], np.broadcast_to(h0c0[0][2], (time, units)), "h of a fully masked row")
    close(r["i"][2], np.zeros((time, units)), "gates of a fully masked row")
    # Gates hold their last valid value on masked steps.
    pm = r["mask"].astype(bool)
    for b in range(batch):
        for t in range(1, time):
            if not pm[b, t]:
                close(r["o"][b, t], r["o"][b, t - 1], f"o held at row {b}, step {t}")


def test_lstm_masking_layer_and_embedding(flavour):
    K = kmod(flavour)
    rng = np.random.default_rng(3)
    units = 3
    # Masking: steps whose features are all zero are skipped.
    x = rand(rng, (2, 5, 3), 2.0)
    x[0, 3:] = 0.0
    x[1, 0] = 0.0
    inp = K.Input((5, 3))
    lstm_layer = K.layers.LSTM(units, return_sequences=True, return_state=True, go_backwards=True)
    model = K.Model(inp, lstm_layer(K.layers.Masking(0.0)(inp)))
    lstm_layer.set_weights([rand(rng, w.shape, 0.9) for w in lstm_layer.get_weights()])
    seq, h, c = (np.asarray(t, np.float64) for t in model(tf.constant(x)))
    r = ref.lstm(x, *weights(lstm_layer), mask=np.any(x != 0, axis=-1), go_backwards=True, flavour=flavour)
    close(seq, r["output"], "output (Masking)")
    close(h, r["last_h"], "last_h (Masking)")
    close(c, r["last_c"], "last_c (Masking)")

    # Embedding(mask_zero=True): token 0 is padding.
    tokens = np.array([[3, 1, 4, 0, 0], [0, 2, 7, 1, 8]], dtype=np.int32)
    inp = K.Input((5,), dtype="int32")
    emb = K.layers.Embedding(9, 3, mask_zero=True)
    lstm_layer = K.layers.LSTM(units, return_sequences=True, return_state=True)
    model = K.Model(inp, lstm_layer(emb(inp)))
    lstm_layer.set_weights([rand(rng, w.shape, 0.9) for w in lstm_layer.get_weights()])
    seq, h, c = (np.asarray(t, np.float64) for t in model(tf.constant(tokens)))
    r = ref.lstm(emb.get_weights()[0][tokens], *weights(lstm_layer), mask=tokens != 0, flavour=flavour)
    close(seq, r["output"], "output (Embedding)")
    close(h, r["last_h"], "last_h (Embedding)")
    close(c, r["last_c"], "last_c (Embedding)")


# ----------------------------------------------------------------------------------------------------------------
# GRU and SimpleRNN
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gru(flavour, reset_after, masked):
    rng = np.random.default_rng(4)
    batch, time, feat, units = 3, 5, 3, 4
    x = rand(rng, (batch, time, feat), 2.0)
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=bool) if masked else None
    h0 = [rand(rng, (batch, units))] if masked else None
    kwargs = {"reset_after": reset_after, "go_backwards": masked, "recurrent_activation": "hard_sigmoid"}
    layer = make_layer(flavour, "GRU", units, x, rng, **kwargs)
    assert layer.get_weights()[2].shape == ((2, 3 * units) if reset_after else (3 * units,))
    seq, h = run_layer(layer, x, mask, h0)
    r = ref.gru(x, *weights(layer), mask=mask, initial_state=h0, flavour=flavour, masked_output=masked_output(flavour), **kwargs)
    close(seq, r["output"], "output")
    close(h, r["last_h"], "last_h")
    check_state_sequences(layer, x, mask, h0, masked, r, ["h"])
    h_prev = np.concatenate([np.zeros((batch, 1, units)) if h0 is None else h0[0][:, None], r["h"][:, :-1]], 1)
    valid = r["mask"][..., None] > 0
    close(np.where(valid, r["z"] * h_prev + (1 - r["z"]) * r["n"], r["h"]), r["h"], "h = z * h_prev + (1 - z) * n")


def test_gru_without_bias(flavour):
    rng = np.random.default_rng(5)
    x = rand(rng, (2, 4, 3), 2.0)
    layer = make_layer(flavour, "GRU", 3, x, rng, use_bias=False, activation="softsign")
    seq, h = run_layer(layer, x)
    r = ref.gru(x, *weights(layer), activation="softsign", flavour=flavour)
    close(seq, r["output"], "output")
    close(h, r["last_h"], "last_h")


@pytest.mark.parametrize("masked", [False, True])
def test_simple_rnn(flavour, masked):
    rng = np.random.default_rng(6)
    batch, time, feat, units = 2, 5, 3, 4
    x = rand(rng, (batch, time, feat), 2.0)
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=bool) if masked else None
    h0 = [rand(rng, (batch, units))] if masked else None
    layer = make_layer(flavour, "SimpleRNN", units, x, rng, go_backwards=masked, activation="elu")
    seq, h = run_layer(layer, x, mask, h0)
    r = ref.simple_rnn(
        x, *weights(layer), mask=mask, initial_state=h0, go_backwards=masked, activation="elu", flavour=flavour, masked_output=masked_output(flavour)
    )
    close(seq, r["output"], "output")
    close(h, r["last_h"], "last_h")
    check_state_sequences(layer, x, mask, h0, masked, r, ["h"])


# ----------------------------------------------------------------------------------------------------------------
# ConvLSTM2D
# ----------------------------------------------------------------------------------------------------------------

CONV_CASES = {
    "same": {"kernel_size": 3, "padding": "same"},
    "valid_stride2": {"kernel_size": 3, "padding": "valid", "strides": 2},
    "same_stride2_even_kernel": {"kernel_size": (2, 3), "padding": "same", "strides": 2},
    "dilated": {"kernel_size": 2, "padding": "same", "dilation_rate": 2, "recurrent_activation": "hard_sigmoid"},
    "masked_backwards_init": {"kernel_size": 3, "padding": "same", "go_backwards": True, "masked": True},
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_lstm2d(flavour, case):
    cfg = dict(CONV_CASES[case])
    masked = cfg.pop("masked", False)
    if masked and masked_output(flavour) == "state0":
        pytest.skip("Keras 3's JAX loop cannot run a masked ConvLSTM2D: its mask does not broadcast over the "
                    "spatial axes (keras/src/backend/jax/rnn.py)")
    rng = np.random.default_rng(7)
    batch, time, rows, cols, channels, filters = 2, 3, 5, 6, 2, 3
    x = rand(rng, (batch, time, rows, cols, channels), 2.0)
    layer = make_layer(flavour, "ConvLSTM2D", filters, x, rng, **cfg)
    out_shape = tuple(layer.compute_output_shape((batch, *x.shape[1:]))[1])
    mask = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool) if masked else None
    h0c0 = [rand(rng, out_shape), rand(rng, out_shape)] if masked else None
    seq, h, c = run_layer(layer, x, mask, h0c0)
    cfg.pop("kernel_size")
    r = ref.conv_lstm2d(x, *weights(layer), mask=mask, initial_state=h0c0, flavour=flavour, masked_output=masked_output(flavour), **cfg)
    assert r["c"].shape == seq.shape
    close(seq, r["output"], "output")
    close(h, r["last_h"], "last_h")
    close(c, r["last_c"], "last_c")
    if masked:
        check_state_sequences(layer, x, mask, h0c0, True, r, ["h", "c"])


def test_conv_lstm2d_channels_first():
    # TensorFlow's CPU Conv2D only runs NHWC; tf-keras transposes around it, Keras 3 does not, so only tf-keras here.
    rng = np.random.default_rng(8)
    x = rand(rng, (2, 3, 2, 5, 4), 2.0)
    layer = make_layer("tfkeras", "ConvLSTM2D", 3, x, rng, kernel_size=3, padding="same",
                       data_format="channels_first")
    seq, h, c = run_layer(layer, x)
    r = ref.conv_lstm2d(x, *weights(layer), padding="same", data_format="channels_first", flavour="tfkeras")
    close(seq, r["output"], "output")
    close(h, r["last_h"], "last_h")
    close(c, r["last_c"], "last_c")


def test_conv2d_matches_tensorflow():
    rng = np.random.default_rng(9)
    x = rand(rng, (2, 7, 6, 3))
    for k, s, d, p in [((3, 3), 1, 1, "same"), ((2, 3), 2, 1, "same"), ((3, 2), 3, 1, "valid"), ((2, 2), 1, 3, "same")]:
        w = rand(rng, (*k, 3, 2))
        expected = tf.nn.conv2d(x, w, strides=s, padding=p.upper(), dilations=d).numpy()
        close(ref.conv2d(x, w, strides=s, padding=p, dilation_rate=d), expected, f"conv2d k={k} s={s} d={d} {p}")


# ----------------------------------------------------------------------------------------------------------------
# Argument checking
# ----------------------------------------------------------------------------------------------------------------


def test_bad_arguments_raise():
    x = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="kernel"):
        ref.lstm(x, np.zeros((3, 6)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="bias"):
        ref.gru(x, np.zeros((3, 6)), np.zeros((2, 6)), np.zeros(6), reset_after=True)
    with pytest.raises(ValueError, match="mask"):
        ref.simple_rnn(x, np.zeros((3, 2)), np.zeros((2, 2)), mask=np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="initial_state"):
        ref.lstm(x, np.zeros((3, 8)), np.zeros((2, 8)), initial_state=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match="flavour"):
        ref.lstm(x, np.zeros((3, 8)), np.zeros((2, 8)), flavour="keras2")
