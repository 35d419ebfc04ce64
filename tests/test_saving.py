"""Traced models save and load (.keras; .h5 for tf-keras) and give the same outputs after reloading."""

from __future__ import annotations

import numpy as np
from conftest import Untouched, outputs_by_name, reference_lstm, run

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
    embedded = np.asarray(model.get_layer("embedding")(x))
    expected = reference_lstm(model.get_layer("encoder"), embedded, flavour_name, mask=x != 0)
    np.testing.assert_allclose(named["encoder.c"], expected["c"], atol=1e-5)
    guard.check()
