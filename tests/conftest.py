"""Shared test fixtures: the Keras-flavour fixture, seeds, and checks every rewrite test makes."""

from __future__ import annotations

import hashlib
import os
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

# The Keras 3 backend of this run (KERAS_BACKEND, read by Keras on import). tf-keras computes on
# TensorFlow only, so a run on JAX or torch covers the Keras 3 flavour alone (`make test` runs the
# suite once per backend).
KERAS_BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
FLAVOURS = ("keras3", "tfkeras") if KERAS_BACKEND == "tensorflow" else ("keras3",)


def masked_output(flavour: str) -> str:
    """What a masked step outputs in the original Keras layer of ``flavour`` on this run's backend:
    Keras 3's JAX and NumPy loops carry states[0], TensorFlow's and torch's the previous output
    (keras/src/backend/jax/rnn.py); tests/reference.py takes it as ``masked_output=``."""
    return "state0" if flavour == "keras3" and KERAS_BACKEND in ("jax", "numpy") else "previous"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tensorflow_only(reason): needs TensorFlow as the Keras 3 backend; skipped, with the "
                   "reason, in a run on JAX or torch")
    config.addinivalue_line(
        "markers", "backend_independent(reason): checks nothing that depends on the Keras 3 backend (the "
                   "reason says what covers the backend's part); the TensorFlow run covers it, a run on JAX "
                   "or torch skips it to keep `make test` short")


def _reason(marker, default: str) -> str:
    return marker.kwargs.get("reason") or (marker.args[0] if marker.args else default)


def pytest_collection_modifyitems(config, items):
    if KERAS_BACKEND == "tensorflow":
        return
    for item in items:
        marker = item.get_closest_marker("tensorflow_only")
        if marker is not None:
            reason = _reason(marker, "TensorFlow only")
            item.add_marker(pytest.mark.skip(reason=f"Keras 3 on {KERAS_BACKEND}: {reason}"))
            continue
        marker = item.get_closest_marker("backend_independent")
        if marker is not None:
            reason = _reason(marker, "nothing backend-specific")
            item.add_marker(pytest.mark.skip(
                reason=f"Keras 3 on {KERAS_BACKEND}: backend-independent, the TensorFlow run covers it ({reason})"))


def keras_of(name: str):
    if name == "keras3":
        import keras
    else:
        import tf_keras as keras
    return keras


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    """Both Keras flavours: ``flavour.name`` ("keras3"/"tfkeras"), ``flavour.keras``, ``flavour.layers``."""
    keras = keras_of(request.param)
    keras.utils.set_random_seed(1234)
    keras.backend.clear_session()
    return types.SimpleNamespace(name=request.param, keras=keras, layers=keras.layers)


def weights_checksum(model) -> str:
    """A checksum of every weight of ``model``, in order, with names: detects any change."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(str(variable.name).encode())
        digest.update(np.ascontiguousarray(np.asarray(variable.numpy())).tobytes())
    return digest.hexdigest()


def to_numpy(value):
    """A tensor of any backend as a NumPy array (a torch tensor that requires grad is detached)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return np.asarray(value)


def as_list(outputs):
    if isinstance(outputs, dict):
        return [to_numpy(v) for v in outputs.values()]
    if isinstance(outputs, (list, tuple)):
        return [to_numpy(o) for o in outputs]
    return [to_numpy(outputs)]


def run(model, x):
    return as_list(model(x, training=False))


class Untouched:
    """Snapshot of a model (weights checksum, outputs, layer names, output names, graph size),
    checked again after a rewrite: the user's model must never change."""

    def __init__(self, model, x):
        self.model, self.x = model, x
        self.checksum = weights_checksum(model)
        self.outputs = run(model, x)
        self.layer_names = [l.name for l in model.layers]
        self.inbound = [len(getattr(l, "_inbound_nodes", [])) for l in model.layers]

    def check(self):
        assert weights_checksum(self.model) == self.checksum, "the original model's weights changed"
        assert [l.name for l in self.model.layers] == self.layer_names, "the original model's layers changed"
        assert [len(getattr(l, "_inbound_nodes", [])) for l in self.model.layers] == self.inbound, \
            "the original model's graph changed (new calls recorded on its layers)"
        for before, after in zip(self.outputs, run(self.model, self.x)):
            np.testing.assert_array_equal(before, after)


def cell_weights(cell):
    """(kernel, recurrent_kernel, bias or None) of a recurrent cell, as NumPy arrays."""
    bias = np.asarray(cell.bias.numpy()) if cell.use_bias else None
    return np.asarray(cell.kernel.numpy()), np.asarray(cell.recurrent_kernel.numpy()), bias


def lstm_weights(layer):
    """(kernel, recurrent_kernel, bias or None) of an LSTM layer, as NumPy arrays."""
    return cell_weights(layer.cell)


def activation_name(fn):
    name = getattr(fn, "__name__", str(fn))
    return {"hard_sigmoid": "hard_sigmoid"}.get(name, name)


def reference_lstm(layer, x, flavour_name, **kwargs):
    """tests/reference.py's LSTM run with ``layer``'s weights and activations."""
    from reference import lstm

    kernel, recurrent_kernel, bias = lstm_weights(layer)
    return lstm(
        x, kernel, recurrent_kernel, bias,
        activation=activation_name(layer.cell.activation),
        recurrent_activation=activation_name(layer.cell.recurrent_activation),
        go_backwards=layer.go_backwards, flavour=flavour_name, **kwargs,
    )


def reference_gru(layer, x, flavour_name, **kwargs):
    """tests/reference.py's GRU with the weights of ``layer`` (a GRU or an RNN over a GRUCell)."""
    from reference import gru

    cell = layer.cell
    return gru(x, *cell_weights(cell), reset_after=cell.reset_after, go_backwards=layer.go_backwards,
               activation=activation_name(cell.activation),
               recurrent_activation=activation_name(cell.recurrent_activation), flavour=flavour_name, **kwargs)


def reference_simple_rnn(layer, x, flavour_name, **kwargs):
    """tests/reference.py's SimpleRNN with the weights of ``layer``."""
    from reference import simple_rnn

    cell = layer.cell
    return simple_rnn(x, *cell_weights(cell), go_backwards=layer.go_backwards,
                      activation=activation_name(cell.activation), flavour=flavour_name, **kwargs)


def outputs_by_name(traced, x):
    return dict(zip(traced.output_names, run(traced, x)))


def assert_states_match(named, site, expected, quantities=("c",), atol=1e-5):
    """Each exposed ``site.q`` equals the reference's ``q`` (shape and values)."""
    for q in quantities:
        got = named[f"{site}.{q}"]
        want = expected[q]
        assert got.shape == want.shape, f"{site}.{q}: shape {got.shape} != reference {want.shape}"
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4, err_msg=f"{site}.{q}")
