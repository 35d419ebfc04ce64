"""expose_cell_states on every recurrent layer: GRU, SimpleRNN, ConvLSTM1D/2D, RNN over Keras cells,
StackedRNNCells and a custom cell, on both Keras flavours.

Every rewrite test checks that the original outputs are unchanged (and the input model untouched),
each state output has its name and shape, and each state equals tests/reference.py (or, for the
custom cell, a NumPy recurrence written in this file).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    KERAS_BACKEND,
    Untouched,
    activation_name,
    cell_weights,
    masked_output,
    outputs_by_name,
    reference_gru,
    reference_lstm,
    reference_simple_rnn,
    run,
    to_numpy,
)

from lstm_rewrite import InvalidArgumentError, UnsupportedLayerError, expose_cell_states
from lstm_rewrite.rewrite import plan_rewrite

rng = np.random.default_rng(11)
GRU_ALL = ("h", "z", "r", "n")
LSTM_ALL = ("c", "h", "i", "f", "g", "o")


def float_batch(batch=3, time=5, features=3):
    return rng.standard_normal((batch, time, features)).astype("float32")


def token_batch(batch=3, time=6, vocab=10):
    ids = rng.integers(1, vocab, size=(batch, time)).astype("int32")
    ids[1, time - 2:] = 0  # trailing padding
    ids[2, :2] = 0  # leading padding: the states before the first valid step
    return ids


def reference_conv_lstm2d(layer, x, flavour_name, **kwargs):
    from reference import conv_lstm2d

    cell = layer.cell
    return conv_lstm2d(x, *cell_weights(cell), padding=cell.padding, strides=cell.strides,
                       dilation_rate=cell.dilation_rate, go_backwards=layer.go_backwards,
                       activation=activation_name(cell.activation),
                       recurrent_activation=activation_name(cell.recurrent_activation),
                       flavour=flavour_name, **kwargs)


def assert_match(named, site, expected, quantities, atol=1e-5):
    for q in quantities:
        got, want = named[f"{site}.{q}"], expected[q]
        assert got.shape == want.shape, f"{site}.{q}: shape {got.shape} != reference {want.shape}"
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4, err_msg=f"{site}.{q}")


def backward_aligned(expected):
    """A backward direction's reference sequences, flipped back to input time (as Bidirectional aligns them)."""
    return {q: v[:, ::-1] for q, v in expected.items() if v.ndim >= 3}


# --- GRU and SimpleRNN -------------------------------------------------------------------


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_state_and_gates(flavour, reset_after):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    gru = layers.GRU(4, return_sequences=True, reset_after=reset_after, bias_initializer="glorot_uniform",
                     name="gru")
    model = keras.Model(inputs, layers.Dense(2, name="head")(gru(inputs)))
    x = float_batch()
    guard = Untouched(model, x)

    # "c" on a GRU means its recurrent state h, so ("c", "h") gives h once.
    traced = expose_cell_states(model, states=("c", "h", "gates"))

    assert traced.output_names == ["head", "gru.h", "gru.z", "gru.r", "gru.n"]
    assert [e.layer_class for e in traced.rewrite_record.exposed] == ["GRU"] * 4
    named = outputs_by_name(traced, x)
    np.testing.assert_allclose(named["head"], guard.outputs[0], atol=1e-6)
    assert_match(named, "gru", reference_gru(gru, x, flavour.name), GRU_ALL)
    guard.check()


def test_default_states_are_each_layers_recurrent_state(flavour):
    """The default states=("c",) means c for an LSTM, h for a GRU or SimpleRNN, every state of a custom cell."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    seq = layers.LSTM(3, return_sequences=True, name="lstm")(inputs)
    seq = layers.GRU(3, return_sequences=True, name="gru")(seq)
    seq = layers.Bidirectional(layers.SimpleRNN(2, return_sequences=True), name="bi")(seq)
    seq = layers.RNN(layers.StackedRNNCells([layers.LSTMCell(2), layers.GRUCell(2)]), return_sequences=True,
                     name="stack")(seq)
    seq = layers.RNN(counter_cell_class(keras)(2), name="custom")(seq)
    model = keras.Model(inputs, seq)

    sites = plan_rewrite(model)

    assert [(s.site, s.kind, s.layer_class) for s in sites] == [
        ("lstm", "lstm", "LSTM"), ("gru", "gru", "GRU"), ("bi", "bidirectional", "Bidirectional(SimpleRNN)"),
        ("stack", "stacked", "RNN(StackedRNNCells)"), ("custom", "generic", "RNN(CounterCell)")]
    assert [s.output_names for s in sites] == [
        ("lstm.c",), ("gru.h",), ("bi.forward.h", "bi.backward.h"), ("stack.cell0.c", "stack.cell1.h"),
        ("custom.state0", "custom.state1")]
    gates = plan_rewrite(model, layers=["lstm", "gru", "stack"], states=("h", "gates"))
    assert [s.quantities for s in gates if s.selected] == [
        ("h", "i", "f", "g", "o"), ("h", "z", "r", "n"),
        ("cell0.h", "cell0.i", "cell0.f", "cell0.g", "cell0.o", "cell1.h", "cell1.z", "cell1.r", "cell1.n")]


def test_simple_rnn(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    rnn = layers.SimpleRNN(4, activation="relu", name="rnn")
    model = keras.Model(inputs, rnn(inputs))
    x = float_batch()
    guard = Untouched(model, x)

    traced = expose_cell_states(model)

    assert traced.output_names == ["rnn", "rnn.h"]
    named = outputs_by_name(traced, x)
    expected = reference_simple_rnn(rnn, x, flavour.name)
    assert_match(named, "rnn", expected, ("h",))
    np.testing.assert_allclose(named["rnn"], expected["last_output"], atol=1e-5)
    guard.check()


def test_inapplicable_states_name_the_layer(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    seq = layers.LSTM(3, return_sequences=True, name="lstm")(inputs)
    model = keras.Model(inputs, layers.SimpleRNN(2, name="plain")(seq))
    guard = Untouched(model, float_batch())

    with pytest.raises(InvalidArgumentError, match=r"'plain' \(SimpleRNN\).*It exposes h; it has no gates.*layers="):
        expose_cell_states(model, states="gates")
    with pytest.raises(InvalidArgumentError, match=r"'lstm' \(LSTM\).*i, f, g, o"):
        expose_cell_states(model, states=("z", "r"))
    # Leaving the SimpleRNN out makes the request fit.
    assert [s.quantities for s in plan_rewrite(model, layers="lstm", states="gates") if s.selected] == [
        ("i", "f", "g", "o")]
    guard.check()


# --- masking, go_backwards, initial_state, return_state, Bidirectional (GRU) ----------------


def test_gru_masked_go_backwards_initial_state(flavour):
    """A leading padded step with a nonzero initial state: h holds the initial state there, gates stay zero."""
    keras, layers = flavour.keras, flavour.layers
    x_in, h_in = keras.Input((None, 3), name="x"), keras.Input((4,), name="h0")
    gru = layers.GRU(4, return_sequences=True, return_state=True, go_backwards=True, name="gru")
    seq, last = gru(layers.Masking(0.0)(x_in), initial_state=[h_in])
    model = keras.Model([x_in, h_in], [seq, last])
    x = float_batch(time=6)
    x[0, -1] = 0.0  # go_backwards: the last input step is the first one processed
    x[1, 3:] = 0.0
    h0 = rng.standard_normal((3, 4)).astype("float32")
    inputs = [x, h0]
    guard = Untouched(model, inputs)

    traced = expose_cell_states(model, states=("h", "gates"), sample_inputs=inputs, expose_masks=True)

    named = outputs_by_name(traced, inputs)
    # Keras 3 drops the mask when initial_state is passed; tf-keras keeps it. The states follow the model.
    mask = np.any(x != 0, axis=-1) if flavour.name == "tfkeras" else None
    expected = reference_gru(gru, x, flavour.name, mask=mask, initial_state=h0)
    assert_match(named, "gru", expected, GRU_ALL)
    np.testing.assert_array_equal(named["gru.mask"], expected["mask"])
    np.testing.assert_allclose(named[model.output_names[1]], expected["last_h"], atol=1e-5)
    if mask is not None:
        np.testing.assert_allclose(named["gru.h"][0, 0], h0[0], atol=1e-6)
        np.testing.assert_array_equal(named["gru.z"][0, 0], 0.0)
    guard.check()


def test_lstm_explicit_mask_with_initial_state(flavour):
    """A mask passed with an initial state, leading padded steps: the output there is what this
    backend's Keras loop gives (on JAX the initial h, elsewhere zeros), c and h hold the initial
    state, the gates zero; every state as the reference says."""
    keras, layers = flavour.keras, flavour.layers
    x_in, h_in, c_in = keras.Input((5, 3), name="x"), keras.Input((4,), name="h0"), keras.Input((4,), name="c0")
    ops = keras.ops if flavour.name == "keras3" else keras.backend

    class ValidSteps(layers.Layer):  # copied from its config, unlike a Lambda
        def call(self, t):
            return ops.any(ops.not_equal(t, 0.0), axis=-1)

    step_mask = ValidSteps(name="step_mask")(x_in)
    lstm = layers.LSTM(4, return_sequences=True, name="lstm")
    model = keras.Model([x_in, h_in, c_in], lstm(x_in, mask=step_mask, initial_state=[h_in, c_in]))
    x = float_batch(time=5)
    x[1, :2] = 0.0  # leading padding: the initial state is carried there
    x[2, 3:] = 0.0
    h0, c0 = (rng.standard_normal((3, 4)).astype("float32") for _ in range(2))
    inputs = [x, h0, c0]
    guard = Untouched(model, inputs)

    traced = expose_cell_states(model, states=("c", "h", "gates"), sample_inputs=inputs)

    named = outputs_by_name(traced, inputs)
    mask = np.any(x != 0, axis=-1)
    expected = reference_lstm(lstm, x, flavour.name, mask=mask, initial_state=[h0, c0],
                              masked_output=masked_output(flavour.name))
    assert_match(named, "lstm", expected, LSTM_ALL)
    np.testing.assert_allclose(named[model.output_names[0]], expected["output"], atol=1e-5)
    np.testing.assert_allclose(named["lstm.c"][1, :2], np.stack([c0[1]] * 2), atol=1e-6)
    np.testing.assert_array_equal(named["lstm.i"][1, :2], 0.0)
    guard.check()


def test_unrolled_masked_lstm(flavour):
    """Unrolled masked LSTMs, forwards, backwards with zero_output_for_mask and in a Bidirectional:
    the output as the original's unrolled loop gives it (Keras's unrolled loops treat masked steps
    unlike its other loops), every state as the reference says."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((6, 3), name="x")
    padded = layers.Masking(0.0, name="masking")(inputs)
    lstms = {"fwd": layers.LSTM(3, unroll=True, return_sequences=True, zero_output_for_mask=True, name="fwd")}
    # Keras's torch loop cannot run an unrolled, masked go_backwards layer (an AttributeError in
    # keras/src/backend/torch/rnn.py): the original model fails there.
    backwards = not (flavour.name == "keras3" and KERAS_BACKEND == "torch")
    if backwards:
        lstms["back"] = layers.LSTM(3, unroll=True, go_backwards=True, return_sequences=True,
                                    zero_output_for_mask=True, name="back")
    outputs = [lstm(padded) for lstm in lstms.values()]
    if backwards:
        outputs.append(layers.Bidirectional(layers.LSTM(2, unroll=True), name="bi")(padded))
    model = keras.Model(inputs, outputs)
    x = float_batch(time=6)
    x[1, 4:] = 0.0
    x[2, :2] = 0.0
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h", "gates"))  # verified against the original

    named = outputs_by_name(traced, x)
    mask = np.any(x != 0, axis=-1)
    for name, lstm in lstms.items():
        assert_match(named, name, reference_lstm(lstm, x, flavour.name, mask=mask,
                                                 masked_output=masked_output(flavour.name)), LSTM_ALL)
    if backwards:
        bi = model.get_layer("bi")
        assert_match(named, "bi.forward", reference_lstm(bi.forward_layer, x, flavour.name, mask=mask), LSTM_ALL)
        assert_match(named, "bi.backward",
                     backward_aligned(reference_lstm(bi.backward_layer, x, flavour.name, mask=mask)), LSTM_ALL)
    guard.check()


def test_bidirectional_gru_masked(flavour):
    keras, layers = flavour.keras, flavour.layers
    tokens = keras.Input((None,), dtype="int32")
    embedding = layers.Embedding(10, 3, mask_zero=True, name="embedding")
    bi = layers.Bidirectional(layers.GRU(3, return_sequences=True), name="bi")
    model = keras.Model(tokens, layers.Dense(2, name="tagger")(bi(embedding(tokens))))
    ids = token_batch()
    guard = Untouched(model, ids)

    traced = expose_cell_states(model, states=("c", "gates"), expose_masks=True)

    assert traced.output_names == ["tagger", *[f"bi.forward.{q}" for q in GRU_ALL],
                                   *[f"bi.backward.{q}" for q in GRU_ALL], "bi.forward.mask", "bi.backward.mask"]
    named = outputs_by_name(traced, ids)
    embedded, mask = to_numpy(embedding(ids)), ids != 0
    assert_match(named, "bi.forward", reference_gru(bi.forward_layer, embedded, flavour.name, mask=mask), GRU_ALL)
    backward = reference_gru(bi.backward_layer, embedded, flavour.name, mask=mask)
    assert_match(named, "bi.backward", backward_aligned(backward), GRU_ALL)
    np.testing.assert_allclose(named["tagger"], guard.outputs[0], atol=1e-5)
    guard.check()


def test_bidirectional_lstm_last_step_and_states_masked(flavour):
    """A masked Bidirectional returning its last step and final states: the backward half's
    sequences aligned with input time, its last step the one it processed last (input step 0)."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((6, 3), name="x")
    bi = layers.Bidirectional(layers.LSTM(3, return_state=True), name="bi")
    model = keras.Model(inputs, bi(layers.Masking(0.0, name="masking")(inputs)))
    x = float_batch(time=6)
    x[1, 4:] = 0.0
    x[2, :2] = 0.0
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h", "gates"), expose_masks=True)

    named = outputs_by_name(traced, x)
    mask = np.any(x != 0, axis=-1)
    assert_match(named, "bi.forward", reference_lstm(bi.forward_layer, x, flavour.name, mask=mask), LSTM_ALL)
    backward = reference_lstm(bi.backward_layer, x, flavour.name, mask=mask)
    assert_match(named, "bi.backward", backward_aligned(backward), LSTM_ALL)
    np.testing.assert_array_equal(named["bi.backward.mask"], mask.astype("float32"))
    last_h = np.concatenate([reference_lstm(bi.forward_layer, x, flavour.name, mask=mask)["last_h"],
                             backward["last_h"]], axis=-1)
    np.testing.assert_allclose(run(traced, x)[0], last_h, atol=1e-5)  # the merged output comes first
    guard.check()


def test_shared_simple_rnn_in_nested_model(flavour):
    keras, layers = flavour.keras, flavour.layers
    inner_in = keras.Input((None, 3))
    shared = layers.SimpleRNN(2, return_sequences=True, name="shared")
    body = keras.Model(inner_in, shared(inner_in), name="body")
    a, b = keras.Input((None, 3), name="a"), keras.Input((None, 3), name="b")
    model = keras.Model([a, b], layers.Add(name="sum")([body(a), shared(b)]))
    xa, xb = float_batch(), float_batch()
    guard = Untouched(model, [xa, xb])

    traced = expose_cell_states(model)

    # Call indices count the calls of each model level: the outer model's one call is "shared".
    assert traced.output_names == ["sum", "body.shared.h", "shared.h"]
    named = outputs_by_name(traced, [xa, xb])
    assert_match(named, "body.shared", reference_simple_rnn(shared, xa, flavour.name), ("h",))
    assert_match(named, "shared", reference_simple_rnn(shared, xb, flavour.name), ("h",))
    guard.check()


# --- ConvLSTM ----------------------------------------------------------------------------


def test_conv_lstm2d(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 4, 4, 2))
    conv = layers.ConvLSTM2D(2, 2, padding="same", return_sequences=True, return_state=True,
                             bias_initializer="glorot_uniform", name="conv")
    seq, h, c = conv(inputs)
    model = keras.Model(inputs, [layers.Flatten(name="flat")(seq), c])
    x = rng.standard_normal((2, 3, 4, 4, 2)).astype("float32")
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h", "gates"))

    assert traced.output_names[2:] == [f"conv.{q}" for q in LSTM_ALL]
    exposed = traced.rewrite_record.exposed
    assert {(e.layer_class, e.units, e.shape) for e in exposed} == {("ConvLSTM2D", 2, (4, 4, 2))}
    named = outputs_by_name(traced, x)
    expected = reference_conv_lstm2d(conv, x, flavour.name)
    assert_match(named, "conv", expected, LSTM_ALL)
    np.testing.assert_allclose(run(traced, x)[1], expected["last_c"], atol=1e-5)
    guard.check()


def test_conv_lstm1d_go_backwards(flavour):
    """ConvLSTM1D against the 2-D reference over a width-1 axis."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 5, 2))
    conv = layers.ConvLSTM1D(3, 2, go_backwards=True, bias_initializer="glorot_uniform", dropout=0.2,
                             recurrent_dropout=0.2, name="conv")
    model = keras.Model(inputs, conv(inputs))
    x = rng.standard_normal((2, 3, 5, 2)).astype("float32")
    guard = Untouched(model, x)

    # sample_inputs of the same batch: tf-keras' ConvLSTM keeps dropout masks across batch sizes.
    traced = expose_cell_states(model, states=("c", "f"), sample_inputs=x)

    named = outputs_by_name(traced, x)
    assert named["conv.c"].shape == (2, 3, 4, 3)  # (batch, time, rows', filters)
    from reference import conv_lstm2d

    cell = conv.cell
    kernel, recurrent_kernel, bias = cell_weights(cell)
    expected = conv_lstm2d(x[:, :, :, None, :], kernel[:, None], recurrent_kernel[:, None], bias, go_backwards=True,
                           recurrent_activation=activation_name(cell.recurrent_activation), flavour=flavour.name)
    assert_match(named, "conv", {q: expected[q][:, :, :, 0] for q in ("c", "f")}, ("c", "f"))
    np.testing.assert_allclose(named["conv"], expected["last_output"][:, :, 0], atol=1e-5)
    # Training mode runs too (dropout on the traced cell's flat states).
    assert [np.shape(o) for o in traced(x, training=True)] == [(2, 4, 3), (2, 3, 4, 3), (2, 3, 4, 3)]
    guard.check()


# --- RNN over Keras cells, stacked cells ---------------------------------------------------


def test_rnn_over_keras_cells(flavour):
    """RNN(LSTMCell), RNN(GRUCell), RNN(SimpleRNNCell) expose what the matching layers do, named after the RNN."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    rnn_lstm = layers.RNN(layers.LSTMCell(3), return_sequences=True, name="rnn_lstm")
    rnn_gru = layers.RNN(layers.GRUCell(3, reset_after=False), return_sequences=True, go_backwards=True,
                         name="rnn_gru")
    rnn_simple = layers.RNN(layers.SimpleRNNCell(2), name="rnn_simple")
    model = keras.Model(inputs, rnn_simple(rnn_gru(rnn_lstm(inputs))))
    x = float_batch()
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h", "gates"), layers=["rnn_lstm", "rnn_gru"])
    default = expose_cell_states(model, layers="rnn_simple")

    assert traced.output_names == ["rnn_simple", *[f"rnn_lstm.{q}" for q in LSTM_ALL],
                                   *[f"rnn_gru.{q}" for q in GRU_ALL]]
    assert traced.rewrite_record.exposed[0].layer_class == "RNN(LSTMCell)"
    named = outputs_by_name(traced, x)
    first = reference_lstm(rnn_lstm, x, flavour.name)
    assert_match(named, "rnn_lstm", first, LSTM_ALL)
    second = reference_gru(rnn_gru, first["output"], flavour.name)
    assert_match(named, "rnn_gru", second, GRU_ALL)
    assert default.output_names == ["rnn_simple", "rnn_simple.h"]
    assert_match(outputs_by_name(default, x), "rnn_simple",
                 reference_simple_rnn(rnn_simple, second["output"], flavour.name), ("h",))
    guard.check()


def test_stacked_cells_masked(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    cells = [layers.LSTMCell(3, dropout=0.2), layers.GRUCell(2, recurrent_dropout=0.2)]  # inactive in inference
    stack = layers.RNN(layers.StackedRNNCells(cells), return_sequences=True, return_state=True, name="stack")
    outputs = stack(layers.Masking(0.0)(inputs))  # Keras 3: (seq, [h0, c0], h1); tf-keras: [seq, h0, c0, h1]
    model = keras.Model(inputs, [outputs[0], outputs[-1]])
    x = float_batch(time=6)
    x[1, 4:] = 0.0
    x[2, :2] = 0.0
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h", "z"), expose_masks=True)

    assert traced.output_names[len(model.output_names):] == [
        "stack.cell0.c", "stack.cell0.h", "stack.cell1.h", "stack.cell1.z", "stack.cell0.mask", "stack.cell1.mask"]
    assert [e.layer_class for e in traced.rewrite_record.exposed] == ["LSTMCell", "LSTMCell", "GRUCell", "GRUCell"]
    named = outputs_by_name(traced, x)
    mask = np.any(x != 0, axis=-1)
    from reference import gru, lstm

    lstm_cell, gru_cell = stack.cell.cells
    lower = lstm(x, *cell_weights(lstm_cell), mask=mask, flavour=flavour.name)
    upper = gru(lower["output"], *cell_weights(gru_cell), reset_after=gru_cell.reset_after, mask=mask,
                flavour=flavour.name)
    assert_match(named, "stack.cell0", lower, ("c", "h"))
    assert_match(named, "stack.cell1", upper, ("h", "z"))
    np.testing.assert_array_equal(named["stack.cell1.mask"], mask.astype("float32"))
    # In training, each call draws dropout masks for its own batch.
    for batch in (2, 3):
        assert np.shape(traced(x[:batch], training=True)[2]) == (batch, 6, 3)
    guard.check()


def test_stacked_cells_initial_state_go_backwards(flavour):
    keras, layers = flavour.keras, flavour.layers
    x_in = keras.Input((None, 3), name="x")
    h0, c0, g0 = keras.Input((2,), name="h0"), keras.Input((2,), name="c0"), keras.Input((3,), name="g0")
    stack = layers.RNN(layers.StackedRNNCells([layers.LSTMCell(2), layers.GRUCell(3)]), return_sequences=True,
                       go_backwards=True, name="stack")
    model = keras.Model([x_in, h0, c0, g0], stack(x_in, initial_state=[[h0, c0], [g0]]))
    inputs = [float_batch(batch=2, time=4), *(rng.standard_normal((2, d)).astype("float32") for d in (2, 2, 3))]
    guard = Untouched(model, inputs)

    named = outputs_by_name(expose_cell_states(model, states=("c", "h"), sample_inputs=inputs), inputs)

    from reference import gru, lstm

    lstm_cell, gru_cell = stack.cell.cells
    lower = lstm(inputs[0], *cell_weights(lstm_cell), go_backwards=True, initial_state=inputs[1:3],
                 flavour=flavour.name)
    upper = gru(lower["output"], *cell_weights(gru_cell), initial_state=inputs[3], flavour=flavour.name)
    assert_match(named, "stack.cell0", lower, ("c", "h"))
    assert_match(named, "stack.cell1", upper, ("h",))
    guard.check()


def test_mixed_float16_gru_and_stack(flavour):
    keras, layers = flavour.keras, flavour.layers
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((None, 3))
        gru = layers.GRU(3, return_sequences=True, name="gru")
        stack = layers.RNN([layers.SimpleRNNCell(2), layers.GRUCell(2)], name="stack")
        model = keras.Model(inputs, layers.Dense(1, dtype="float32", name="head")(stack(gru(inputs))))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    x = float_batch()
    guard = Untouched(model, x)

    named = outputs_by_name(expose_cell_states(model, states=("c", "gates")), x)

    assert named["gru.z"].dtype == np.float16 and named["stack.cell1.h"].dtype == np.float16
    np.testing.assert_allclose(named["head"], guard.outputs[0], atol=1e-2)
    expected = reference_gru(gru, x, flavour.name)
    np.testing.assert_allclose(named["gru.h"].astype(np.float64), expected["h"], atol=3e-2)
    guard.check()


# --- custom cells ------------------------------------------------------------------------


def counter_cell_class(keras):
    """A custom cell with two states of different widths and an output of a third width:
    ``s = tanh(x W + s U)``, ``k = k + x V`` (a running sum), ``output = [s, k] P``."""

    class CounterCell(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.state_size = [units, 2]
            self.output_size = units + 1

        def build(self, input_shape):
            features = int(input_shape[-1])
            self.w = self.add_weight(shape=(features, self.units), name="w")
            self.u = self.add_weight(shape=(self.units, self.units), name="u")
            self.v = self.add_weight(shape=(features, 2), name="v")
            self.p = self.add_weight(shape=(self.units + 2, self.units + 1), name="p")
            self.built = True

        def call(self, inputs, states):
            ops = keras.ops if hasattr(keras, "ops") else keras.backend
            s = ops.tanh(ops.dot(inputs, self.w) + ops.dot(states[0], self.u))
            k = states[1] + ops.dot(inputs, self.v)
            return ops.dot(ops.concatenate([s, k], axis=-1), self.p), [s, k]

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    return CounterCell


def reference_counter(cell, x, mask):
    """The CounterCell recurrence in NumPy, with Keras masking (states carry over masked steps)."""
    w, u, v, p = (np.asarray(t.numpy(), np.float64) for t in (cell.w, cell.u, cell.v, cell.p))
    s, k = np.zeros((len(x), cell.units)), np.zeros((len(x), 2))
    states0, states1, outputs, previous = [], [], [], np.zeros((len(x), cell.units + 1))
    for t in range(x.shape[1]):
        m = mask[:, t, None]
        s_new = np.tanh(x[:, t] @ w + s @ u)
        k_new = k + x[:, t] @ v
        out = np.concatenate([s_new, k_new], axis=-1) @ p
        s, k = np.where(m, s_new, s), np.where(m, k_new, k)
        previous = np.where(m, out, previous)
        states0.append(s)
        states1.append(k)
        outputs.append(previous)
    return {"state0": np.stack(states0, 1), "state1": np.stack(states1, 1), "output": np.stack(outputs, 1)}


@pytest.mark.skipif(KERAS_BACKEND in ("jax", "numpy"), reason="Keras's own JAX loop cannot run the original masked RNN over a cell whose output is not its states[0] (a broadcasting error in keras/src/backend/jax/rnn.py)")
def test_custom_cell(flavour):
    keras, layers = flavour.keras, flavour.layers
    CounterCell = counter_cell_class(keras)
    inputs = keras.Input((None, 3))
    custom = layers.RNN(CounterCell(3), return_sequences=True, name="custom")
    model = keras.Model(inputs, custom(layers.Masking(0.0)(inputs)))
    x = float_batch(time=6)
    x[1, 3:] = 0.0
    guard = Untouched(model, x)

    traced = expose_cell_states(model, expose_masks=True)

    assert traced.output_names == ["custom", "custom.state0", "custom.state1", "custom.mask"]
    assert [(e.layer_class, e.units) for e in traced.rewrite_record.exposed] == [("RNN(CounterCell)", 3),
                                                                                 ("RNN(CounterCell)", 2)]
    named = outputs_by_name(traced, x)
    mask = np.any(x != 0, axis=-1)
    expected = reference_counter(custom.cell, x.astype(np.float64), mask)
    assert_match(named, "custom", expected, ("state0", "state1"))
    np.testing.assert_allclose(named["custom"], expected["output"], atol=1e-5)
    with pytest.raises(InvalidArgumentError, match=r"'custom' \(RNN\(CounterCell\)\).*state0, state1"):
        expose_cell_states(model, states="gates")
    assert [s.quantities for s in plan_rewrite(model, states="state1")] == [("state1",)]
    guard.check()


def test_custom_cells_that_cannot_be_traced(flavour):
    keras, layers = flavour.keras, flavour.layers
    CounterCell = counter_cell_class(keras)

    class NestedCell(CounterCell):
        def __init__(self, units, **kwargs):
            super().__init__(units, **kwargs)
            self.state_size = [[units, 2]]

        def call(self, inputs, states):
            output, (s, k) = super().call(inputs, list(states[0]))
            return output, [[s, k]]

    class UncopiableCell(CounterCell):
        def __init__(self, units, table, **kwargs):  # `table` is not in the config
            super().__init__(units, **kwargs)
            self.table = table

    inputs = keras.Input((None, 3))
    nested = keras.Model(inputs, layers.RNN(NestedCell(2), name="nested")(inputs))
    uncopiable = keras.Model(inputs, layers.RNN(UncopiableCell(2, object()), name="uncopiable")(inputs))

    with pytest.raises(UnsupportedLayerError, match=r"'nested' \(RNN\(NestedCell\)\).*not flat.*state_size"):
        expose_cell_states(nested)
    with pytest.raises(UnsupportedLayerError, match=r"'uncopiable' \(RNN\(UncopiableCell\)\).*get_config"):
        expose_cell_states(uncopiable)

    class ScaledGRU(layers.GRU):
        # Not a wrapper of super().call (that is exposed, see test_keras2_models.py): its own step.
        def call(self, sequences, initial_state=None, mask=None, training=False):
            return sequences[..., :2] * 2.0

    mixed_in = keras.Input((None, 3))
    seq = ScaledGRU(2, return_sequences=True, name="scaled")(mixed_in)
    mixed = keras.Model(mixed_in, layers.GRU(2, name="gru")(seq))
    with pytest.raises(UnsupportedLayerError, match=r"'scaled' \(ScaledGRU\) is a GRU whose call.*overridden"):
        expose_cell_states(mixed)
    # Excluded, it is copied like any other layer.
    x = float_batch()
    guard = Untouched(mixed, x)
    traced = expose_cell_states(mixed, layers="gru")
    assert traced.output_names == ["gru", "gru.h"]
    np.testing.assert_allclose(run(traced, x)[0], guard.outputs[0], atol=1e-6)
    guard.check()


# --- saving ------------------------------------------------------------------------------


def test_traced_gru_stack_and_conv_lstm_save_and_reload(flavour, tmp_path):
    keras, layers = flavour.keras, flavour.layers
    seq_in = keras.Input((None, 3), name="seq")
    grid_in = keras.Input((3, 4, 4, 1), name="grid")
    seq = layers.Bidirectional(layers.GRU(2, return_sequences=True), name="bi")(seq_in)
    seq = layers.RNN([layers.SimpleRNNCell(2), layers.LSTMCell(2)], name="stack")(seq)
    grid = layers.ConvLSTM2D(2, 3, name="conv")(grid_in)
    model = keras.Model([seq_in, grid_in], [seq, layers.Flatten(name="flat")(grid)])
    x = [float_batch(), rng.standard_normal((3, 3, 4, 4, 1)).astype("float32")]
    traced = expose_cell_states(model, states=("c", "h", "gates"))
    before = run(traced, x)

    path = str(tmp_path / "traced.keras")
    traced.save(path)
    reloaded = keras.models.load_model(path)

    assert list(reloaded.output_names) == list(traced.output_names)
    for want, got in zip(before, run(reloaded, x)):
        np.testing.assert_allclose(got, want, atol=1e-6)
