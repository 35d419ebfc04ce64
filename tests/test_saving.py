"""Traced models save and load (.keras; .h5 for tf-keras) and give the same outputs after reloading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import Untouched, assert_states_match, outputs_by_name, reference_lstm, run, to_numpy

import lstm_rewrite  # noqa: F401  (registers the traced layers for deserialization)
from lstm_rewrite import expose_cell_states


def tagger(keras):
    layers = keras.layers
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedded = layers.Embedding(12, 4, mask_zero=True, name="embedding")(tokens)
    seq, h, c = layers.LSTM(4, return_sequences=True, return_state=True, name="encoder")(embedded)
    bi = layers.Bidirectional(layers.LSTM(3, return_sequences=True), name="bi")(seq)
    return keras.Model(tokens, [layers.Dense(2, name="tags")(bi), h])


def ids():
    x = np.random.default_rng(5).integers(1, 12, size=(3, 6)).astype("int32")
    x[1, 4:] = 0
    x[2, 2:] = 0
    return x


def test_save_and_reload(flavour, tmp_path):
    """.keras on both flavours; legacy .h5 on tf-keras, the format of the models saved before Keras 3."""
    for suffix in [".keras"] + ([".h5"] if flavour.name == "tfkeras" else []):
        check_round_trip(flavour.keras, flavour.name, tmp_path, suffix)


def check_round_trip(keras, flavour_name, tmp_path, suffix):
    model = tagger(keras)
    x = ids()
    guard = Untouched(model, x)
    traced = expose_cell_states(model, states=("c", "h", "gates"))
    before = run(traced, x)

    path = str(tmp_path / f"traced{suffix}")
    traced.save(path)
    reloaded = keras.models.load_model(path)

    assert list(reloaded.output_names) == list(traced.output_names)
    for want, got in zip(before, run(reloaded, x)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    named = outputs_by_name(reloaded, x)
    embedded = to_numpy(model.get_layer("embedding")(x))
    expected = reference_lstm(model.get_layer("encoder"), embedded, flavour_name, mask=x != 0)
    np.testing.assert_allclose(named["encoder.c"], expected["c"], atol=1e-5)
    guard.check()


# ---------------------------------------------------------------------------------------------
# Files written by an earlier release
# ---------------------------------------------------------------------------------------------

SAVED_BY_0_1_0 = Path(__file__).parent / "data" / "saved_by_0_1_0"
GATES = ("c", "h", "i", "f", "g", "o")


def test_traced_models_saved_by_0_1_0_still_load(flavour):
    """Traced models saved with release 0.1.0 load and give the states of the reference.

    0.1.0 ran Keras 3's traced layers on a plain ``RNN``, whose outputs came back stacked in one
    tensor; files saved then still name that class. The files (and the original models, saved
    with them) were written by 0.1.0's code: a masked Embedding, an LSTM, a Bidirectional LSTM,
    every state exposed.
    """
    from lstm_rewrite import load_model

    original = load_model(SAVED_BY_0_1_0 / f"{flavour.name}_original.keras")
    traced = load_model(SAVED_BY_0_1_0 / f"{flavour.name}_traced.keras")
    ids = np.load(SAVED_BY_0_1_0 / "ids.npy")

    named = outputs_by_name(traced, ids)
    np.testing.assert_allclose(named["tags"], run(original, ids)[0], atol=1e-5)
    embedded, mask = to_numpy(original.get_layer("embedding")(ids)), ids != 0
    encoder = reference_lstm(original.get_layer("encoder"), embedded, flavour.name, mask=mask)
    assert_states_match(named, "encoder", encoder, GATES)
    bi = original.get_layer("bi")
    forward = reference_lstm(bi.forward_layer, encoder["output"], flavour.name, mask=mask)
    backward = reference_lstm(bi.backward_layer, encoder["output"], flavour.name, mask=mask)
    backward = {q: v[:, ::-1] for q, v in backward.items() if v.ndim == 3}  # back to input time
    assert_states_match(named, "bi.forward", forward, GATES)
    assert_states_match(named, "bi.backward", backward, GATES)
