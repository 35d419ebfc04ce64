"""Bad input to expose_cell_states: a clear error from the library's hierarchy naming the layer and the fix,
and the user's model left exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Untouched

from lstm_rewrite import (
    InvalidArgumentError,
    LstmRewriteError,
    UnsupportedLayerError,
    UnsupportedModelError,
    VerificationError,
    expose_cell_states,
    verify,
)

x = np.random.default_rng(3).standard_normal((2, 5, 4)).astype("float32")


def small_model(keras, name="encoder"):
    inputs = keras.Input((None, 4))
    return keras.Model(inputs, keras.layers.LSTM(3, name=name)(inputs))


def test_subclassed_model(flavour):
    keras = flavour.keras

    class Tagger(keras.Model):
        def __init__(self):
            super().__init__(name="tagger")
            self.lstm = keras.layers.LSTM(3)

        def call(self, inputs):
            return self.lstm(inputs)

    model = Tagger()
    model(x)
    with pytest.raises(UnsupportedModelError, match=r"'tagger'.*subclassed.*functional API"):
        expose_cell_states(model)


def test_unbuilt_sequential(flavour):
    keras = flavour.keras
    model = keras.Sequential([keras.layers.LSTM(3, name="lstm")], name="unbuilt")
    with pytest.raises(UnsupportedModelError, match=r"'unbuilt'.*(not built|subclassed)"):
        expose_cell_states(model)


def test_no_lstm(flavour):
    keras = flavour.keras
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs), name="mlp")
    with pytest.raises(UnsupportedModelError, match=r"'mlp' has no LSTM.*dense"):
        expose_cell_states(model)


def test_time_distributed_lstm(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((2, 5, 4))
    model = keras.Model(inputs, layers.TimeDistributed(layers.LSTM(3), name="per_clip")(inputs))
    guard = Untouched(model, np.zeros((1, 2, 5, 4), "float32"))
    with pytest.raises(UnsupportedLayerError, match=r"'per_clip' \(TimeDistributed\) wraps an LSTM.*layers="):
        expose_cell_states(model)
    guard.check()


def test_lstm_subclass_overriding_call(flavour):
    keras, layers = flavour.keras, flavour.layers

    class ScaledLSTM(layers.LSTM):
        # Not a wrapper of super().call (that is exposed, see test_keras2_models.py): its own step.
        def call(self, sequences, initial_state=None, mask=None, training=False):
            return sequences[:, -1, :3] * 2.0

    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, ScaledLSTM(3, name="scaled")(inputs))
    guard = Untouched(model, x)
    with pytest.raises(UnsupportedLayerError, match=r"'scaled'.*overridden.*layers="):
        expose_cell_states(model)
    guard.check()


def test_unknown_state_name(flavour):
    model = small_model(flavour.keras)
    with pytest.raises(InvalidArgumentError, match=r"Unknown state 'cell'.*'gates'") as info:
        expose_cell_states(model, states=("c", "cell"))
    assert isinstance(info.value, ValueError)


def test_unknown_layer_name_lists_the_lstms(flavour):
    model = small_model(flavour.keras)
    with pytest.raises(InvalidArgumentError, match=r"no LSTM of that name.*\['encoder'\]"):
        expose_cell_states(model, layers=["decoder"])


def test_verification_failure_names_the_output(flavour, monkeypatch):
    """A traced model that does not reproduce the outputs is refused with the output's name."""
    from lstm_rewrite.rewrite import weights

    model = small_model(flavour.keras)
    guard = Untouched(model, x)
    original = weights.copy_weights

    def corrupt(backend, planned, traced):
        original(backend, planned, traced)
        traced.rnn.cell.kernel.assign(traced.rnn.cell.kernel.numpy() + 0.1)

    monkeypatch.setattr(weights, "copy_weights", corrupt)
    with pytest.raises(VerificationError, match=r"'encoder': max \|diff\|") as info:
        expose_cell_states(model)
    assert not info.value.report.ok
    assert isinstance(info.value, LstmRewriteError)
    guard.check()


def test_verify_report(flavour):
    model = small_model(flavour.keras)
    traced = expose_cell_states(model, verify=False)
    report = verify(model, traced, x)
    assert report.ok and report.batch_size == 2
    assert [o.name for o in report.outputs] == ["encoder"]
    assert report.outputs[0].max_abs_diff < 1e-5
    assert "encoder" in str(report)
