"""Keras 3 backends: a traced model saved under one backend exposes the same states under another.

The other backend runs in a subprocess (Keras picks its backend once, at import): TensorFlow when
this run is on JAX, JAX when it is on TensorFlow. Both runs are checked against tests/reference.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import KERAS_BACKEND, masked_output, reference_lstm

OTHER = "jax" if KERAS_BACKEND == "tensorflow" else "tensorflow"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None or KERAS_BACKEND not in ("tensorflow", "jax"),
    reason="needs Keras 3 on TensorFlow and on JAX (`pip install 'jax[cpu]'`)",
)

# Loads the traced file under the other backend and writes its outputs, by name.
LOAD_AND_RUN = """
import sys, numpy as np, keras, lstm_rewrite
from lstm_rewrite import cell_states, load_model
traced = load_model(sys.argv[1])
x = np.load(sys.argv[2])
assert keras.backend.backend() == sys.argv[4], keras.backend.backend()
states = cell_states(traced, x, states=None, progress=False)
outputs = traced.predict(x, verbose=0)
np.savez(sys.argv[3], **{name: states[name] for name in states}, **{"out:" + n: np.asarray(o)
         for n, o in zip(traced.output_names, outputs)})
"""


def test_a_model_saved_under_one_backend_exposes_the_same_states_under_another(tmp_path):
    import keras

    from lstm_rewrite import cell_states, expose_cell_states

    keras.utils.set_random_seed(3)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(9, 4, mask_zero=True, name="emb")(tokens)
    x = keras.layers.LSTM(5, return_sequences=True, go_backwards=True, name="back")(x)
    x = keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True), name="bi")(x)
    model = keras.Model(tokens, keras.layers.Dense(2, name="out")(x))
    ids = np.random.default_rng(4).integers(1, 9, size=(4, 7)).astype("int32")
    ids[1, 4:] = 0
    ids[3, 2:] = 0
    traced = expose_cell_states(model, states=("c", "h", "gates"), expose_masks=True)
    path, data, result = tmp_path / "traced.keras", tmp_path / "ids.npy", tmp_path / "other.npz"
    traced.save(path)
    np.save(data, ids)

    env = {**os.environ, "KERAS_BACKEND": OTHER, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(path), str(data), str(result), OTHER],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    here = cell_states(traced, ids, states=None, progress=False)
    with np.load(result) as other:
        assert sorted(n for n in other.files if not n.startswith("out:")) == sorted(here)
        for name in here:
            np.testing.assert_allclose(other[name], here[name], atol=1e-6, err_msg=f"{name} under {OTHER}")
        # The original outputs agree where both backends' Keras agree (no initial state here).
        np.testing.assert_allclose(other["out:out"], traced.predict(ids, verbose=0)[0], atol=1e-6)
    # And the states are the reference's, not only each other's.
    embedded = np.asarray(model.get_layer("emb")(ids))
    want = reference_lstm(model.get_layer("back"), embedded, "keras3", mask=ids != 0,
                          masked_output=masked_output("keras3"))
    for q in ("c", "h", "i", "f", "g", "o"):
        np.testing.assert_allclose(here[f"back.{q}"], want[q], atol=1e-5, rtol=1e-4, err_msg=q)
