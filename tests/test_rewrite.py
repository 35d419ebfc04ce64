"""The core contract of expose_cell_states, on both Keras flavours.

Every test checks three things: the original outputs are unchanged (and the input model is
untouched), each state output has its name and shape, and each state equals tests/reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    KERAS_BACKEND,
    Untouched,
    assert_states_match,
    outputs_by_name,
    reference_lstm,
    run,
    to_numpy,
)

from lstm_rewrite import expose_cell_states

ALL = ("c", "h", "i", "f", "g", "o")
rng = np.random.default_rng(7)


def float_batch(batch=3, time=6, features=4):
    return rng.standard_normal((batch, time, features)).astype("float32")


def token_batch(batch=3, time=7, vocab=12):
    ids = rng.integers(1, vocab, size=(batch, time)).astype("int32")
    for b in range(1, batch):
        ids[b, time - b - 1:] = 0  # trailing padding, a different length per sample
    ids[-1, 0] = 0  # and one leading padded step
    return ids


def embed(model_layer, ids):
    return to_numpy(model_layer(ids))


def test_plain_lstm_all_quantities(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 4))
    lstm = layers.LSTM(5, name="encoder")
    model = keras.Model(inputs, layers.Dense(2, name="head")(lstm(inputs)))
    x = float_batch()
    guard = Untouched(model, x)

    traced = expose_cell_states(model, states=("c", "h", "gates"))

    assert traced.output_names == ["head"] + [f"encoder.{q}" for q in ALL]
    named = outputs_by_name(traced, x)
    np.testing.assert_allclose(named["head"], guard.outputs[0], atol=1e-6)
    expected = reference_lstm(lstm, x, flavour.name)
    assert_states_match(named, "encoder", expected, ALL)
    guard.check()


def test_last_c_equals_return_state(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 3))
    out, h, c = layers.LSTM(4, return_state=True, name="lstm")(inputs)
    model = keras.Model(inputs, [out, h, c])
    x = float_batch(features=3)
    guard = Untouched(model, x)

    named = outputs_by_name(expose_cell_states(model), x)

    original_c = guard.outputs[2]
    np.testing.assert_allclose(named["lstm.c"][:, -1], original_c, atol=1e-6)
    assert_states_match(named, "lstm", reference_lstm(model.get_layer("lstm"), x, flavour.name))
    guard.check()


@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_masked_embedding(flavour, go_backwards, return_sequences):
    keras, layers = flavour.keras, flavour.layers
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedding = layers.Embedding(12, 4, mask_zero=True, name="embedding")
    lstm = layers.LSTM(3, return_sequences=return_sequences, go_backwards=go_backwards, name="lstm")
    model = keras.Model(tokens, lstm(embedding(tokens)))
    ids = token_batch()
    guard = Untouched(model, ids)

    traced = expose_cell_states(model, states=("c", "h", "gates"), expose_masks=True)

    named = outputs_by_name(traced, ids)
    np.testing.assert_allclose(named[model.output_names[0]], guard.outputs[0], atol=1e-6)
    expected = reference_lstm(lstm, embed(embedding, ids), flavour.name, mask=ids != 0)
    assert_states_match(named, "lstm", expected, ALL)
    np.testing.assert_array_equal(named["lstm.mask"], expected["mask"])
    guard.check()


def test_masking_layer_and_stacked(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 4))
    masked = layers.Masking(mask_value=0.0)(inputs)
    first = layers.LSTM(5, return_sequences=True, name="first")
    second = layers.LSTM(3, name="second")
    model = keras.Model(inputs, second(first(masked)))
    x = float_batch(batch=4)
    x[1, 4:] = 0.0
    x[2, 2:] = 0.0
    guard = Untouched(model, x)

    named = outputs_by_name(expose_cell_states(model, states=("c", "h")), x)

    mask = np.any(x != 0.0, axis=-1)
    expected_first = reference_lstm(first, x, flavour.name, mask=mask)
    assert_states_match(named, "first", expected_first, ("c", "h"))
    expected_second = reference_lstm(second, expected_first["output"], flavour.name, mask=mask)
    assert_states_match(named, "second", expected_second, ("c", "h"))
    np.testing.assert_allclose(named["second"], guard.outputs[0], atol=1e-6)
    guard.check()


def test_seq2seq_initial_state(flavour):
    keras, layers = flavour.keras, flavour.layers
    source = keras.Input((None,), dtype="int32", name="source")
    target = keras.Input((None,), dtype="int32", name="target")
    source_embedding = layers.Embedding(12, 4, mask_zero=True, name="source_embedding")
    target_embedding = layers.Embedding(12, 4, mask_zero=True, name="target_embedding")
    encoder = layers.LSTM(5, return_state=True, name="encoder")
    decoder = layers.LSTM(5, return_sequences=True, name="decoder")
    _, h, c = encoder(source_embedding(source))
    decoded = decoder(target_embedding(target), initial_state=[h, c])
    model = keras.Model([source, target], layers.Dense(12, name="logits")(decoded))
    ids_source, ids_target = token_batch(), token_batch(time=5)
    x = [ids_source, ids_target]
    guard = Untouched(model, x)

    named = outputs_by_name(expose_cell_states(model, states=("c", "h")), x)

    encoded = reference_lstm(encoder, embed(source_embedding, ids_source), flavour.name, mask=ids_source != 0)
    assert_states_match(named, "encoder", encoded, ("c", "h"))
    # Keras 3 drops the mask when initial_state is passed; tf-keras keeps it. The states follow the model.
    decoder_mask = (ids_target != 0) if flavour.name == "tfkeras" else None
    expected = reference_lstm(decoder, embed(target_embedding, ids_target), flavour.name, mask=decoder_mask,
                              initial_state=[encoded["last_h"], encoded["last_c"]])
    assert_states_match(named, "decoder", expected, ("c", "h"))
    np.testing.assert_allclose(named["logits"], guard.outputs[0], atol=1e-5)
    guard.check()


def test_masked_initial_state_carries_before_first_step(flavour):
    """A leading padded step with a nonzero initial state: c holds the initial state there."""
    keras, layers = flavour.keras, flavour.layers
    x_in = keras.Input((None, 3), name="x")
    h_in = keras.Input((4,), name="h0")
    c_in = keras.Input((4,), name="c0")
    masked = layers.Masking(0.0)(x_in)
    lstm = layers.LSTM(4, return_sequences=True, name="lstm")
    model = keras.Model([x_in, h_in, c_in], lstm(masked, initial_state=[h_in, c_in]))
    x = float_batch(features=3)
    x[:, 0] = 0.0
    h0, c0 = rng.standard_normal((2, 3, 4)).astype("float32")
    inputs = [x, h0, c0]
    guard = Untouched(model, inputs)

    named = outputs_by_name(expose_cell_states(model, states=("c", "h", "gates"), sample_inputs=inputs), inputs)

    mask = np.any(x != 0, axis=-1) if flavour.name == "tfkeras" else None
    expected = reference_lstm(lstm, x, flavour.name, mask=mask, initial_state=[h0, c0])
    assert_states_match(named, "lstm", expected, ALL)
    if mask is not None:
        np.testing.assert_allclose(named["lstm.c"][:, 0], c0, atol=1e-6)
    guard.check()


@pytest.mark.parametrize("merge_mode", ["concat", "mul", None])  # sum and ave: as concat, by fuzz
def test_bidirectional_masked(flavour, merge_mode):
    keras, layers = flavour.keras, flavour.layers
    tokens = keras.Input((None,), dtype="int32")
    embedding = layers.Embedding(12, 4, mask_zero=True, name="embedding")
    bi = layers.Bidirectional(layers.LSTM(3, return_sequences=True), merge_mode=merge_mode, name="bi")
    out = bi(embedding(tokens))
    out = out if merge_mode is not None else layers.Concatenate(name="merged")(out)
    model = keras.Model(tokens, layers.Dense(2, name="tagger")(out))
    ids = token_batch()
    guard = Untouched(model, ids)

    named = outputs_by_name(expose_cell_states(model, states=("c", "h")), ids)

    embedded, mask = embed(embedding, ids), ids != 0
    forward = reference_lstm(bi.forward_layer, embedded, flavour.name, mask=mask)
    backward = reference_lstm(bi.backward_layer, embedded, flavour.name, mask=mask)
    backward = {q: v[:, ::-1] for q, v in backward.items() if v.ndim == 3}  # back to input time
    assert_states_match(named, "bi.forward", forward, ("c", "h"))
    assert_states_match(named, "bi.backward", backward, ("c", "h"))
    np.testing.assert_allclose(named["tagger"], guard.outputs[0], atol=1e-5)
    guard.check()


def test_shared_layer_called_twice(flavour):
    keras, layers = flavour.keras, flavour.layers
    a, b = keras.Input((None, 4), name="a"), keras.Input((None, 4), name="b")
    shared = layers.LSTM(3, name="shared")
    model = keras.Model([a, b], layers.Add(name="sum")([shared(a), shared(b)]))
    xa, xb = float_batch(), float_batch()
    guard = Untouched(model, [xa, xb])

    traced = expose_cell_states(model)

    assert traced.output_names == ["sum", "shared.c", "shared.call1.c"]
    named = outputs_by_name(traced, [xa, xb])
    assert_states_match(named, "shared", reference_lstm(shared, xa, flavour.name))
    assert_states_match(named, "shared.call1", reference_lstm(shared, xb, flavour.name))
    # One traced layer serves both calls, as in the original.
    assert len([l for l in traced.layers if l.name == "shared"]) == 1
    guard.check()


def test_nested_models(flavour):
    keras, layers = flavour.keras, flavour.layers
    inner_in = keras.Input((None, 4))
    inner_lstm = layers.LSTM(3, return_sequences=True, name="inner")
    inner = keras.Model(inner_in, inner_lstm(inner_in), name="inner_model")
    body_in = keras.Input((None, 4))
    body = keras.Model(body_in, layers.Dense(4, name="proj")(inner(body_in)), name="body")
    top_in = keras.Input((None, 4))
    top_lstm = layers.LSTM(2, name="top")
    model = keras.Model(top_in, top_lstm(body(top_in)))
    x = float_batch()
    guard = Untouched(model, x)

    traced = expose_cell_states(model)

    assert traced.output_names == ["top", "body.inner_model.inner.c", "top.c"]
    named = outputs_by_name(traced, x)
    expected_inner = reference_lstm(inner_lstm, x, flavour.name)
    assert_states_match(named, "body.inner_model.inner", expected_inner)
    projected = to_numpy(body(x))
    assert_states_match(named, "top", reference_lstm(top_lstm, projected, flavour.name))
    guard.check()


def test_sequential(flavour):
    keras, layers = flavour.keras, flavour.layers
    model = keras.Sequential([
        keras.Input((None, 4)),
        layers.LSTM(3, return_sequences=True, name="l1"),
        layers.LSTM(2, name="l2"),
        layers.Dense(1, name="out"),
    ])
    x = float_batch()
    guard = Untouched(model, x)

    traced = expose_cell_states(model)

    assert traced.output_names == ["out", "l1.c", "l2.c"]
    named = outputs_by_name(traced, x)
    first = reference_lstm(model.get_layer("l1"), x, flavour.name)
    assert_states_match(named, "l1", first)
    assert_states_match(named, "l2", reference_lstm(model.get_layer("l2"), first["output"], flavour.name))
    guard.check()


def test_sequential_loaded_from_file(flavour, tmp_path):
    keras, layers = flavour.keras, flavour.layers
    model = keras.Sequential([keras.Input((None, 4)), layers.LSTM(3, name="lstm"), layers.Dense(1, name="out")])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = float_batch()
    guard = Untouched(loaded, x)

    named = outputs_by_name(expose_cell_states(loaded), x)

    assert_states_match(named, "lstm", reference_lstm(loaded.get_layer("lstm"), x, flavour.name))
    guard.check()


def test_multi_input_multi_output(flavour):
    keras, layers = flavour.keras, flavour.layers
    a, b = keras.Input((None, 4), name="a"), keras.Input((None, 2), name="b")
    la, lb = layers.LSTM(3, return_sequences=True, name="la"), layers.LSTM(3, name="lb")
    seq = la(a)
    model = keras.Model([a, b], [layers.Dense(1, name="y1")(seq), layers.Add(name="y2")([seq[:, -1], lb(b)])])
    xa, xb = float_batch(), float_batch(features=2)
    guard = Untouched(model, [xa, xb])

    traced = expose_cell_states(model, states=("c", "h"))

    assert traced.output_names[:2] == list(model.output_names)
    named = outputs_by_name(traced, [xa, xb])
    assert_states_match(named, "la", reference_lstm(la, xa, flavour.name), ("c", "h"))
    assert_states_match(named, "lb", reference_lstm(lb, xb, flavour.name), ("c", "h"))
    guard.check()


@pytest.mark.parametrize("config", [
    dict(activation="relu", recurrent_activation="hard_sigmoid"),
    dict(activation="softsign", recurrent_activation="sigmoid", use_bias=False),
    dict(activation="tanh", recurrent_activation="sigmoid", unit_forget_bias=False, implementation=1),
    dict(dropout=0.3, recurrent_dropout=0.3, implementation=2),
])
def test_cell_configurations(flavour, config):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 4))
    lstm = layers.LSTM(4, return_sequences=True, name="lstm", bias_initializer="glorot_uniform", **config)
    model = keras.Model(inputs, lstm(inputs))
    x = float_batch()
    guard = Untouched(model, x)

    named = outputs_by_name(expose_cell_states(model, states="gates"), x)

    assert_states_match(named, "lstm", reference_lstm(lstm, x, flavour.name), ("i", "f", "g", "o"))
    guard.check()


def test_layers_selector(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 4))
    first = layers.LSTM(3, return_sequences=True, name="first")
    second = layers.LSTM(2, name="second")
    model = keras.Model(inputs, second(first(inputs)))
    x = float_batch()
    guard = Untouched(model, x)

    by_name = expose_cell_states(model, layers="second")
    by_list = expose_cell_states(model, layers=["first"], states=("h",))
    by_predicate = expose_cell_states(model, layers=lambda layer: layer.units == 3)

    assert by_name.output_names == ["second", "second.c"]
    assert by_list.output_names == ["second", "first.h"]
    assert by_predicate.output_names == ["second", "first.c"]
    first_ref = reference_lstm(first, x, flavour.name)
    assert_states_match(outputs_by_name(by_list, x), "first", first_ref, ("h",))
    assert_states_match(outputs_by_name(by_name, x), "second",
                        reference_lstm(second, first_ref["output"], flavour.name))
    guard.check()


def test_stateful_carries_states_across_batches(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(batch_shape=(2, 3, 4))
    lstm = layers.LSTM(3, stateful=True, return_sequences=True, name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    x1, x2 = float_batch(batch=2, time=3), float_batch(batch=2, time=3)
    checksum_model = Untouched(model, x1)  # runs once; reset below
    _reset(model)

    traced = expose_cell_states(model, states=("c", "h"))
    first = outputs_by_name(traced, x1)
    second = outputs_by_name(traced, x2)

    ref1 = reference_lstm(lstm, x1, flavour.name)
    ref2 = reference_lstm(lstm, x2, flavour.name, initial_state=[ref1["last_h"], ref1["last_c"]])
    assert_states_match(first, "lstm", ref1, ("c", "h"))
    assert_states_match(second, "lstm", ref2, ("c", "h"))
    _reset(traced)
    assert_states_match(outputs_by_name(traced, x1), "lstm", ref1, ("c", "h"))
    # A batch of another size is refused as the original refuses it (its states hold 2 sequences).
    with pytest.raises(ValueError, match="(?i)batch size|expected shape=\\(2,"):
        model(float_batch(batch=3, time=3))
    with pytest.raises(ValueError, match="(?i)batch size|expected shape=\\(2,"):
        traced(float_batch(batch=3, time=3))
    _reset(model)
    checksum_model.check()


def test_traced_layers_keep_the_original_configuration(flavour):
    """The rewrite builds its layers with zero initialisers (the weights are copied in at once):
    the configurations it saves must still name the original initialisers."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, 4))
    lstm = layers.LSTM(3, return_sequences=True, recurrent_initializer="orthogonal",
                       kernel_initializer="he_normal", bias_initializer="ones", name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    traced = expose_cell_states(model)

    cell = traced.get_layer("lstm").rnn.cell
    for key in ("kernel_initializer", "recurrent_initializer", "bias_initializer"):
        assert cell.get_config()[key] == lstm.cell.get_config()[key], key
    # And the weights are the original's, not the zeros the layer was built with.
    for got, want in zip(traced.get_layer("lstm").get_weights(), lstm.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert not np.all(traced.get_layer("lstm").get_weights()[1] == 0)


@pytest.mark.skipif(KERAS_BACKEND in ("jax", "numpy"), reason="JAX's loop zeroes masked steps with one where over one "
                    "tensor, so there the traced cell concatenates its parts")
def test_keras3_loop_keeps_exposed_sequences_apart():
    """Keras 3's RNN stacks a tuple of step outputs into one tensor (a copy of every exposed
    sequence); the traced layers' inner RNN hands them back one by one. (tf-keras's RNN returns
    the tuple as it is.)"""
    import keras

    layers = keras.layers
    inputs = keras.Input((6, 4))
    lstm = layers.LSTM(3, return_sequences=True, name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    traced = expose_cell_states(model, states=ALL)

    inner = traced.get_layer("lstm").rnn
    sequence = inner(float_batch(time=6))[0]
    assert isinstance(sequence, (list, tuple)) and len(sequence) == len(ALL)
    assert all(tuple(part.shape) == (3, 6, 3) for part in sequence)


def _reset(model):
    for layer in model.layers:
        if hasattr(layer, "reset_states") and getattr(layer, "stateful", None) is not False:
            try:
                layer.reset_states()
            except (AttributeError, TypeError):
                pass


def test_mixed_float16(flavour):
    keras, layers = flavour.keras, flavour.layers
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((None, 4))
        lstm = layers.LSTM(4, return_sequences=True, name="lstm")
        model = keras.Model(inputs, layers.Dense(2, dtype="float32", name="head")(lstm(inputs)))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    x = float_batch()
    guard = Untouched(model, x)

    traced = expose_cell_states(model)
    named = outputs_by_name(traced, x)

    assert named["lstm.c"].dtype == np.float16
    np.testing.assert_allclose(named["head"], guard.outputs[0], atol=1e-2)
    expected = reference_lstm(lstm, x, flavour.name)
    np.testing.assert_allclose(named["lstm.c"].astype(np.float64), expected["c"], atol=3e-2)
    guard.check()


def test_traced_outputs_run_with_predict(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((5, 4))
    model = keras.Model(inputs, layers.LSTM(3, name="lstm")(inputs))
    x = float_batch(batch=5, time=5)
    traced = expose_cell_states(model)
    predicted = traced.predict(x, batch_size=2, verbose=0)
    assert [np.shape(p) for p in predicted] == [(5, 3), (5, 5, 3)]
    np.testing.assert_allclose(predicted[1], reference_lstm(model.get_layer("lstm"), x, flavour.name)["c"], atol=1e-5)
