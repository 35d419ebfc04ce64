"""method="reconstruct" (the GPU fast path) on CPU, both flavours, against tests/reference.py.

The reconstruction keeps a copy of the LSTM for h and rebuilds c and the gates outside the
recurrence, so every test compares all six quantities with the NumPy oracle, checks the original
outputs, and that the rewrite really reconstructed (not traced) the layer.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Untouched, assert_states_match, outputs_by_name, reference_lstm, run, to_numpy

from lstm_rewrite import expose_cell_states
from lstm_rewrite.errors import InvalidArgumentError

ALL = ("c", "h", "i", "f", "g", "o")
rng = np.random.default_rng(11)


def float_batch(batch=3, time=6, features=3):
    return rng.standard_normal((batch, time, features)).astype("float32")


def padded(x):
    """Trailing padding of different lengths, a leading padded step and a hole in the middle."""
    x = x.copy()
    x[1, 4:] = 0.0
    x[2, 2:] = 0.0
    x[0, 0] = 0.0
    x[0, 3] = 0.0
    return x


def reconstructed_layers(traced):
    return [type(l).__name__ for l in traced.layers if type(l).__name__.startswith("Reconstructed")]


@pytest.mark.parametrize("go_backwards", [False, True])
def test_masked_all_quantities(flavour, go_backwards):
    """Two LSTMs on the same masked input cover both directions with and without return_sequences."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    masked = layers.Masking(0.0)(inputs)
    seq = layers.LSTM(4, return_sequences=True, go_backwards=go_backwards, name="seq",
                      bias_initializer="glorot_uniform")
    last = layers.LSTM(3, go_backwards=not go_backwards, name="last", bias_initializer="glorot_uniform")
    model = keras.Model(inputs, [seq(masked), last(masked)])
    x = padded(float_batch())
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h", "gates"), method="reconstruct", expose_masks=True)

    assert reconstructed_layers(traced) == ["ReconstructedLSTM", "ReconstructedLSTM"]
    assert traced.rewrite_record.method == "reconstruct"
    named = outputs_by_name(traced, x)
    for name, want in zip(model.output_names, guard.outputs):
        np.testing.assert_allclose(named[name], want, atol=1e-6)
    mask = np.any(x != 0, axis=-1)
    for layer in (seq, last):
        expected = reference_lstm(layer, x, flavour.name, mask=mask)
        assert_states_match(named, layer.name, expected, ALL)
        np.testing.assert_array_equal(named[f"{layer.name}.mask"], expected["mask"])
    guard.check()


def test_initial_state_and_return_state(flavour):
    """Nonzero initial state with a leading padded step (tf-keras keeps the mask, Keras 3 drops it)."""
    keras, layers = flavour.keras, flavour.layers
    x_in, h_in, c_in = keras.Input((None, 3), name="x"), keras.Input((4,), name="h0"), keras.Input((4,), name="c0")
    lstm = layers.LSTM(4, return_sequences=True, return_state=True, name="lstm")
    seq, h, c = lstm(layers.Masking(0.0)(x_in), initial_state=[h_in, c_in])
    model = keras.Model([x_in, h_in, c_in], [seq, h, c])
    x = padded(float_batch())
    h0, c0 = rng.standard_normal((2, 3, 4)).astype("float32")
    inputs = [x, h0, c0]
    guard = Untouched(model, inputs)

    traced = expose_cell_states(model, states=("c", "h", "gates"), sample_inputs=inputs, method="reconstruct")

    assert reconstructed_layers(traced) == ["ReconstructedLSTM"]
    outputs = run(traced, inputs)
    for want, got in zip(guard.outputs, outputs[:3]):
        np.testing.assert_allclose(got, want, atol=1e-6)
    mask = np.any(x != 0, axis=-1) if flavour.name == "tfkeras" else None
    expected = reference_lstm(lstm, x, flavour.name, mask=mask, initial_state=[h0, c0])
    assert_states_match(outputs_by_name(traced, inputs), "lstm", expected, ALL)
    guard.check()


@pytest.mark.parametrize("merge_mode", ["concat", None])
def test_bidirectional_embedding(flavour, merge_mode):
    """tf-keras forces zero_output_for_mask on Bidirectional's LSTMs: zeros at padded steps, as cuDNN
    writes them, so h must be rebuilt from the carried state, not from the raw output."""
    keras, layers = flavour.keras, flavour.layers
    tokens = keras.Input((None,), dtype="int32")
    embedding = layers.Embedding(12, 4, mask_zero=True, name="embedding")
    bi = layers.Bidirectional(layers.LSTM(3, return_sequences=True), merge_mode=merge_mode, name="bi")
    out = bi(embedding(tokens))
    out = out if merge_mode is not None else layers.Concatenate(name="merged")(out)
    model = keras.Model(tokens, layers.Dense(2, name="tagger")(out))
    ids = rng.integers(1, 12, size=(3, 7)).astype("int32")
    ids[1, 5:] = 0
    ids[2, 2:] = 0
    guard = Untouched(model, ids)

    traced = expose_cell_states(model, states=("c", "h", "gates"), method="reconstruct")

    assert reconstructed_layers(traced) == ["ReconstructedBidirectional"]
    named = outputs_by_name(traced, ids)
    np.testing.assert_allclose(named["tagger"], guard.outputs[0], atol=1e-5)
    embedded, mask = to_numpy(embedding(ids)), ids != 0
    forward = reference_lstm(bi.forward_layer, embedded, flavour.name, mask=mask)
    backward = reference_lstm(bi.backward_layer, embedded, flavour.name, mask=mask)
    backward = {q: v[:, ::-1] for q, v in backward.items() if v.ndim == 3}
    assert_states_match(named, "bi.forward", forward, ALL)
    assert_states_match(named, "bi.backward", backward, ALL)
    guard.check()


def test_zero_output_for_mask_and_stacked(flavour):
    """The first LSTM writes zeros at masked steps (like cuDNN); the second sees them as input."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    first = layers.LSTM(5, return_sequences=True, zero_output_for_mask=True, name="first")
    second = layers.LSTM(3, name="second")
    masked = layers.Masking(0.0)(inputs)
    model = keras.Model(inputs, second(first(masked)))
    x = padded(float_batch(batch=4))
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h"), method="reconstruct")

    named = outputs_by_name(traced, x)
    mask = np.any(x != 0, axis=-1)
    expected_first = reference_lstm(first, x, flavour.name, mask=mask, zero_output_for_mask=True)
    assert_states_match(named, "first", expected_first, ("c", "h"))
    expected_second = reference_lstm(second, expected_first["output"], flavour.name, mask=mask)
    assert_states_match(named, "second", expected_second, ("c", "h"))
    np.testing.assert_allclose(named["second"], guard.outputs[0], atol=1e-6)
    guard.check()


def test_long_unmasked_sequence_matches_the_traced_method(flavour):
    """Many scan rounds (T=37, not a power of two), activations other than the defaults, no bias."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((37, 3))
    lstm = layers.LSTM(4, return_sequences=True, activation="softsign", recurrent_activation="hard_sigmoid",
                       use_bias=False, name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    x = float_batch(batch=2, time=37)

    reconstructed = outputs_by_name(expose_cell_states(model, states=("c", "gates"), method="reconstruct"), x)
    traced = outputs_by_name(expose_cell_states(model, states=("c", "gates"), method="trace"), x)

    expected = reference_lstm(lstm, x, flavour.name)
    assert_states_match(reconstructed, "lstm", expected, ("c", "i", "f", "g", "o"))
    for name in traced:
        np.testing.assert_allclose(reconstructed[name], traced[name], atol=1e-5, rtol=1e-4, err_msg=name)


def test_save_and_reload(flavour, tmp_path):
    keras, layers = flavour.keras, flavour.layers
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedded = layers.Embedding(12, 4, mask_zero=True, name="embedding")(tokens)
    model = keras.Model(tokens, layers.Bidirectional(layers.LSTM(3), name="bi")(embedded))
    ids = rng.integers(1, 12, size=(3, 6)).astype("int32")
    ids[1, 4:] = 0
    traced = expose_cell_states(model, states=("c", "h"), method="reconstruct")
    before = run(traced, ids)

    for suffix in [".keras"] + ([".h5"] if flavour.name == "tfkeras" else []):
        path = str(tmp_path / f"reconstructed{suffix}")
        traced.save(path)
        reloaded = keras.models.load_model(path)
        assert reconstructed_layers(reloaded) == ["ReconstructedBidirectional"]
        assert list(reloaded.output_names) == list(traced.output_names)
        for want, got in zip(before, run(reloaded, ids)):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_stateful_and_recurrent_dropout_are_traced(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(batch_shape=(2, 5, 3))
    first = layers.LSTM(4, return_sequences=True, recurrent_dropout=0.2, name="first")
    second = layers.LSTM(3, stateful=True, return_sequences=True, name="second")
    third = layers.LSTM(2, dropout=0.3, name="third")
    model = keras.Model(inputs, third(second(first(inputs))))
    x = float_batch(batch=2, time=5)

    traced = expose_cell_states(model, method="reconstruct")

    kinds = {l.name: type(l).__name__ for l in traced.layers}
    assert (kinds["first"], kinds["second"], kinds["third"]) == ("TracedRNN", "TracedRNN", "ReconstructedLSTM")
    named = outputs_by_name(traced, x)
    assert_states_match(named, "first", reference_lstm(first, x, flavour.name))
    with pytest.raises(InvalidArgumentError, match="third.*training=True.*method='trace'"):
        traced(x, training=True)


def test_method_argument(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, layers.LSTM(2, name="lstm")(inputs))

    # No GPU in the test environment: "auto" traces.
    assert reconstructed_layers(expose_cell_states(model, verify=False)) == []
    assert expose_cell_states(model, verify=False).rewrite_record.method == "trace"
    with pytest.raises(InvalidArgumentError, match="method=.*'fast'"):
        expose_cell_states(model, method="fast")


@pytest.mark.tensorflow_only(reason="runs the scan in a tf.function of unknown length (its tf.while_loop path)")
def test_linear_scan_matches_a_loop():
    import tensorflow as tf

    from lstm_rewrite.backends.keras3 import linear_scan

    a = rng.uniform(0, 1, size=(2, 11, 3)).astype("float32")
    b = rng.standard_normal((2, 11, 3)).astype("float32")
    s0 = rng.standard_normal((2, 3)).astype("float32")
    want, state = [], s0.astype("float64")
    for t in range(11):
        state = a[:, t] * state + b[:, t]
        want.append(state)
    want = np.stack(want, axis=1)
    np.testing.assert_allclose(linear_scan(tf.constant(a), tf.constant(b), tf.constant(s0)), want, rtol=1e-5, atol=1e-6)
    # Unknown time length: the rounds run in a while loop.
    dynamic = tf.function(linear_scan, input_signature=[tf.TensorSpec((None, None, 3))] * 2 + [tf.TensorSpec((None, 3))])
    np.testing.assert_allclose(dynamic(a, b, s0), want, rtol=1e-5, atol=1e-6)
    # No initial state: zeros. Lengths around powers of two (where the last round falls).
    for steps in (1, 2, 7, 8, 9, 11):
        want, state = [], np.zeros((2, 3))
        for t in range(steps):
            state = a[:, t] * state + b[:, t]
            want.append(state)
        got = linear_scan(tf.constant(a[:, :steps]), tf.constant(b[:, :steps]), None)
        np.testing.assert_allclose(got, np.stack(want, axis=1), rtol=1e-5, atol=1e-6, err_msg=f"{steps} steps")
