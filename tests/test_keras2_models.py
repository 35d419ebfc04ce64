"""Models as they are found in the wild: Keras 2 text models and recurrent-layer subclasses.

Keras 2 text models declare their ``Input`` float32 (the Keras 2 default) and feed it to an
``Embedding``, which casts the ids. Verification inputs for them must be ids, not normal floats
(tf-keras refuses negative ids). And a backward LSTM subclass whose ``call`` only reverses the
output of ``super().call(...)`` back to input order is exposed by running its own ``call`` over
the traced layer.

Every rewrite test checks the original outputs, each state's name and shape, and each state
against tests/reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KERAS_BACKEND, Untouched, activation_name, assert_states_match, outputs_by_name, reference_lstm, run

from lstm_rewrite import DataError, UnsupportedLayerError, VerificationError, expose_cell_states
from lstm_rewrite.rewrite import rewrite_model
from lstm_rewrite.verify import synthesize_inputs

VOCAB, MAXLEN = 20, 7
rng = np.random.default_rng(11)


def float_ids(batch=3):
    """Token ids as a Keras 2 text pipeline hands them over: float32, trailing zeros for padding."""
    ids = rng.integers(1, VOCAB, size=(batch, MAXLEN)).astype("float32")
    for b in range(1, batch):
        ids[b, MAXLEN - 2 * b:] = 0
    return ids


def reference_gru(layer, x, flavour_name, **kwargs):
    from reference import gru

    cell = layer.cell
    bias = np.asarray(cell.bias.numpy()) if cell.use_bias else None
    return gru(x, np.asarray(cell.kernel.numpy()), np.asarray(cell.recurrent_kernel.numpy()), bias,
               reset_after=cell.reset_after, go_backwards=layer.go_backwards,
               activation=activation_name(cell.activation),
               recurrent_activation=activation_name(cell.recurrent_activation), flavour=flavour_name, **kwargs)


def keras2_text_model(flavour, rnn, wrap):
    """``Input(dtype="float32")`` -> ``Embedding(mask_zero=True)`` -> LSTM or GRU -> Dense.

    ``wrap``: "functional" (all in one model), "nested" (Embedding and RNN in a functional
    model called by the outer one, which has its own float32 Input) or "sequential" (in a
    Sequential called by the outer model). Returns (model, embedding, rnn layer, its site).
    """
    keras, layers = flavour.keras, flavour.layers
    embedding = layers.Embedding(VOCAB, 4, mask_zero=True, name="embedding")
    recurrent = (layers.LSTM if rnn == "lstm" else layers.GRU)(5, name="encoder")
    head = layers.Dense(2, name="head")
    tokens = keras.Input((MAXLEN,), dtype="float32", name="tokens")
    if wrap == "functional":
        return keras.Model(tokens, head(recurrent(embedding(tokens)))), embedding, recurrent, "encoder"
    if wrap == "nested":
        inner_tokens = keras.Input((MAXLEN,), dtype="float32", name="inner_tokens")
        body = keras.Model(inner_tokens, recurrent(embedding(inner_tokens)), name="body")
    else:
        body = keras.Sequential([keras.Input((MAXLEN,), dtype="float32"), embedding, recurrent], name="body")
    return keras.Model(tokens, head(body(tokens))), embedding, recurrent, "body.encoder"


@pytest.mark.parametrize("wrap", ["functional", "nested", "sequential"])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_keras2_float_input_into_an_embedding(flavour, rnn, wrap):
    """The plain call works: the synthesized verification inputs of a float32 input that feeds an
    Embedding (through nested models and Sequential wrappers too) are ids in [1, input_dim), 0 on
    the padded steps. Before, they were normal floats, and tf-keras refused the negative ids."""
    model, embedding, recurrent, site = keras2_text_model(flavour, rnn, wrap)
    ids = float_ids()
    guard = Untouched(model, ids)

    synthesized = synthesize_inputs(model)
    assert synthesized.dtype == np.float32 and synthesized.shape == (3, MAXLEN)
    assert np.array_equal(synthesized, np.round(synthesized)), "ids must be whole numbers"
    assert synthesized.min() >= 0 and synthesized.max() < VOCAB
    assert (synthesized[0] >= 1).all() and (synthesized[1:] == 0).any(), "valid ids, then padding"

    states = ("c", "h") if rnn == "lstm" else ("h",)
    traced = expose_cell_states(model, states=states)

    assert traced.output_names == ["head"] + [f"{site}.{q}" for q in states]
    named = outputs_by_name(traced, ids)
    np.testing.assert_allclose(named["head"], guard.outputs[0], atol=1e-6)
    embedded = np.asarray(embedding(ids.astype("int32")))
    reference = reference_lstm if rnn == "lstm" else reference_gru
    expected = reference(recurrent, embedded, flavour.name, mask=ids != 0)
    assert_states_match(named, site, expected, states)
    guard.check()


@pytest.mark.skipif(KERAS_BACKEND in ("jax", "numpy"), reason="JAX's gather clamps an out-of-range id instead of raising, so the original model runs on the synthesized ids there")
def test_synthesized_inputs_that_do_not_fit_say_why(flavour):
    """An input cast to ids by a Lambda before its Embedding: nothing tells the synthesis it holds
    ids, so it gets normal floats, and the model fails on them. The message names the input, what
    the model expects, what was synthesized and why, and the way out."""
    keras, layers = flavour.keras, flavour.layers
    if flavour.name == "keras3":
        to_ids = layers.Lambda(lambda t: keras.ops.cast(t * 100.0, "int32"), name="to_ids")
    else:
        import tensorflow as tf

        to_ids = layers.Lambda(lambda t: tf.cast(t * 100.0, "int32"), name="to_ids")
    tokens = keras.Input((MAXLEN,), dtype="float32", name="scores")
    model = keras.Model(tokens, layers.LSTM(3, name="encoder")(layers.Embedding(5, 4)(to_ids(tokens))))

    with pytest.raises(DataError) as info:
        expose_cell_states(model)

    message = str(info.value)
    assert "synthesized for verification" in message and "(None, 7) float32" in message
    assert "'scores' float32 (3, 7): standard-normal floats (no Embedding consumes it" in message
    assert "sample_inputs=" in message and "Received (synthesized):" in message


# --- recurrent-layer subclasses -------------------------------------------------------------


def flip_time(flavour):
    if flavour.name == "keras3":
        return lambda t: flavour.keras.ops.flip(t, axis=1)
    import tensorflow as tf

    return lambda t: tf.reverse(t, axis=[1])


def reversing_lstm_class(flavour):
    """The pattern found in the wild: a backward LSTM whose output is put back in input order."""
    flip = flip_time(flavour)

    class ReversingLSTM(flavour.layers.LSTM):
        def call(self, sequences, initial_state=None, mask=None, training=False):
            out = super().call(sequences, initial_state=initial_state, mask=mask, training=training)
            return flip(out)

    return ReversingLSTM


def reversing_model(flavour):
    keras, layers = flavour.keras, flavour.layers
    ReversingLSTM = reversing_lstm_class(flavour)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedding = layers.Embedding(12, 4, mask_zero=True, name="embedding")
    lstm = ReversingLSTM(5, go_backwards=True, return_sequences=True, name="rev")
    model = keras.Model(tokens, layers.Dense(2, name="head")(lstm(embedding(tokens))))
    ids = rng.integers(1, 12, size=(3, 6)).astype("int32")
    ids[1, 4:] = 0
    ids[2, 2:] = 0
    return model, embedding, lstm, ids, ReversingLSTM


ALL = ("c", "h", "i", "f", "g", "o")


def test_lstm_subclass_that_reverses_its_output_is_exposed(flavour):
    """Time order: the exposed states are in the LSTM's processing order, like those of a plain
    go_backwards LSTM (index 0 = the last input step); the subclass's reversal applies to its
    output only. So ``rev.h`` flipped in time is the layer's (input-ordered) output."""
    model, embedding, lstm, ids, _ = reversing_model(flavour)
    guard = Untouched(model, ids)

    traced, record = rewrite_model(model, states=("c", "h", "gates"))
    expose_cell_states(model, states=("c", "h", "gates"))  # verification passes

    assert traced.output_names == ["head"] + [f"rev.{q}" for q in ALL]
    assert [e.time_order for e in record.exposed] == ["go_backwards"] * len(ALL)
    named = outputs_by_name(traced, ids)
    np.testing.assert_allclose(named["head"], guard.outputs[0], atol=1e-6)
    embedded = np.asarray(embedding(ids))
    expected = reference_lstm(lstm, embedded, flavour.name, mask=ids != 0)
    assert_states_match(named, "rev", expected, ALL)
    layer_output = np.asarray(lstm(embedded, mask=ids != 0))  # [batch, time, units], input order
    np.testing.assert_allclose(named["rev.h"][:, ::-1], layer_output, atol=1e-5)
    assert not np.allclose(named["rev.h"], layer_output, atol=1e-3), "states must not be in input order"
    guard.check()


def test_traced_lstm_subclass_saves_and_loads_with_its_class(flavour, tmp_path):
    """The traced layer names the subclass in its config; loading takes the class as loading the
    original model does (custom_objects)."""
    model, embedding, lstm, ids, ReversingLSTM = reversing_model(flavour)
    traced = expose_cell_states(model, states=("c",))
    path = str(tmp_path / "traced.keras")
    traced.save(path)

    loaded = flavour.keras.models.load_model(path, custom_objects={"ReversingLSTM": ReversingLSTM})

    for want, got in zip(run(traced, ids), run(loaded, ids)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    expected = reference_lstm(lstm, np.asarray(embedding(ids)), flavour.name, mask=ids != 0)
    assert_states_match(outputs_by_name(loaded, ids), "rev", expected)


def refused_subclasses(flavour):
    layers = flavour.layers

    class OwnStepLSTM(layers.LSTM):  # computes its output without the Keras LSTM
        def call(self, sequences, initial_state=None, mask=None, training=False):
            return sequences[:, -1, :3]

    class MaskingLSTM(layers.LSTM):  # wraps super().call, but also changes its mask
        def call(self, sequences, initial_state=None, mask=None, training=False):
            return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

        def compute_mask(self, inputs, mask=None):
            return None

    return {"a call that does not run super().call": (OwnStepLSTM, "does not run super"),
            "another method overridden": (MaskingLSTM, r"also defines \['compute_mask'\]")}


@pytest.mark.parametrize("case", ["a call that does not run super().call", "another method overridden"])
def test_lstm_subclasses_that_verification_cannot_prove_are_refused(flavour, case):
    keras = flavour.keras
    subclass, why = refused_subclasses(flavour)[case]
    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, subclass(3, name="custom")(inputs))
    x = rng.standard_normal((2, 5, 4)).astype("float32")
    guard = Untouched(model, x)
    with pytest.raises(UnsupportedLayerError, match=rf"'custom' \({subclass.__name__}\).*overridden.*{why}.*layers="):
        expose_cell_states(model)
    guard.check()


def test_wrapping_lstm_subclass_inside_bidirectional_is_refused(flavour):
    keras, layers = flavour.keras, flavour.layers
    ReversingLSTM = reversing_lstm_class(flavour)
    inputs = keras.Input((None, 4))
    with keras.utils.custom_object_scope({"ReversingLSTM": ReversingLSTM}):  # Bidirectional copies it
        model = keras.Model(inputs, layers.Bidirectional(ReversingLSTM(3, name="rev"), name="bi")(inputs))
    with pytest.raises(UnsupportedLayerError, match=r"'\w*rev\w*' \(inside 'bi'\).*inside a wrapper.*layers="):
        expose_cell_states(model)


def test_lstm_subclass_whose_call_differs_over_the_traced_layer_fails_verification(flavour):
    """A call reading an attribute of its own: over the traced layer it takes its default, the
    outputs differ, and verification says which layer ran its own call."""
    layers, keras = flavour.layers, flavour.keras

    class ScaledLSTM(layers.LSTM):
        def __init__(self, units, scale=2.0, **kwargs):
            super().__init__(units, **kwargs)
            self.scale = scale

        def call(self, sequences, initial_state=None, mask=None, training=False):
            out = super().call(sequences, initial_state=initial_state, mask=mask, training=training)
            return out * getattr(self, "scale", 1.0)

    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, ScaledLSTM(3, name="scaled")(inputs))
    with pytest.raises(VerificationError, match=r"'scaled' \(ScaledLSTM\).*layers="):
        expose_cell_states(model)
    traced = expose_cell_states(model, verify=False)
    x = rng.standard_normal((2, 5, 4)).astype("float32")
    assert_states_match(outputs_by_name(traced, x), "scaled", reference_lstm(model.get_layer("scaled"), x, flavour.name))


def test_lstm_subclass_whose_call_fails_over_the_traced_layer_is_refused(flavour):
    layers, keras = flavour.layers, flavour.keras

    class UnitsLSTM(layers.LSTM):
        def call(self, sequences, initial_state=None, mask=None, training=False):
            out = super().call(sequences, initial_state=initial_state, mask=mask, training=training)
            return out[..., : self.units - 1]

    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, UnitsLSTM(3, name="narrow")(inputs))
    with pytest.raises(UnsupportedLayerError, match=r"'narrow' \(UnitsLSTM\) overrides call.*fails.*units.*layers="):
        expose_cell_states(model)
