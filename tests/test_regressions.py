"""Regression tests: every bug the fuzzer (tests/test_fuzz.py) or the round-trip tests found, by name.

Fuzzer findings are kept as specs (see tests/fuzz_models.py), cut down by hand to what triggers
the bug, and checked with the same properties as the fuzzer (`fuzz_models.check_spec`).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Untouched, outputs_by_name, reference_lstm

import fuzz_models
from lstm_rewrite import expose_cell_states
from lstm_rewrite.verify import synthesize_inputs


def lstm_config(units=3, **overrides) -> dict:
    """An LSTM config as the fuzzer writes it."""
    config = dict(units=units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                  unit_forget_bias=True, bias_initializer="random_normal", dropout=0.0, recurrent_dropout=0.0,
                  return_sequences=False, return_state=False, go_backwards=False)
    config.update(overrides)
    return config


def float_input(name, time, features, static_time=False, padding=([0, 0], [0, 1])) -> dict:
    return {"op": "input", "name": name, "kind": "float", "time": time, "features": features,
            "static_time": static_time, "padding": [list(p) for p in padding]}


def spec_of(ops, outputs, states=("c",), sample_inputs=True, expose_masks=False, layers=None, batch=2) -> dict:
    return {"flavour": None, "seed": 0, "batch": batch,
            "program": {"name": "fuzz", "ops": ops, "outputs": outputs},
            "expose": {"states": list(states), "layers": layers, "expose_masks": expose_masks,
                       "sample_inputs": sample_inputs}}


def test_synthesized_inputs_follow_a_declared_time_length(flavour):
    """Fuzzer, Keras 3: an input of fixed length 6 concatenated with one of free length. Verification
    synthesized 7 steps for the free one, and the original model failed with a raw TensorFlow
    InvalidArgumentError from Concatenate instead of verifying."""
    spec = spec_of(
        [float_input("fixed", 6, 2, static_time=True), float_input("free", 6, 4),
         {"op": "concatenate", "name": "both", "srcs": [0, 1]},
         {"op": "recurrent", "kind": "lstm", "name": "encoder", "src": 2, "config": lstm_config(),
          "initial_state": None}],
        outputs=[3], sample_inputs=False,
    )
    model, _ = fuzz_models.build(spec, flavour.name)
    assert [a.shape[1] for a in synthesize_inputs(model)] == [6, 6]
    fuzz_models.check_spec(spec, flavour.name)


def test_verification_restores_stateful_bidirectional_states(flavour):
    """Round trip, both flavours: verification ran the traced model and restored the states of a
    traced LSTM, but not those of a traced Bidirectional's inner RNNs, so the first predict after
    expose_cell_states started from the verification batch's final states."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(batch_shape=(2, 3, 4))
    bi = layers.Bidirectional(layers.LSTM(2, stateful=True, return_sequences=True), name="bi")
    model = keras.Model(inputs, bi(inputs))
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype("float32")

    traced = expose_cell_states(model, states=("c",))

    named = outputs_by_name(traced, x)
    original = np.asarray(model(x))
    np.testing.assert_allclose(named[model.output_names[0]], original, atol=1e-6)
    forward = reference_lstm(bi.forward_layer, x, flavour.name)
    np.testing.assert_allclose(named["bi.forward.c"], forward["c"], atol=1e-5)


def test_a_stateful_model_is_left_as_verification_found_it(flavour):
    """The same bug seen from the user's model: expose_cell_states must not move its states."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(batch_shape=(2, 3, 4))
    bi = layers.Bidirectional(layers.LSTM(2, stateful=True), name="bi")
    model = keras.Model(inputs, bi(inputs))
    model(np.random.default_rng(2).standard_normal((2, 3, 4)).astype("float32"))  # states now nonzero
    before = [np.array(s) for layer in (bi.forward_layer, bi.backward_layer) for s in layer.states]

    traced = expose_cell_states(model)

    after = [np.array(s) for layer in (bi.forward_layer, bi.backward_layer) for s in layer.states]
    assert all(np.abs(b).sum() > 0 for b in before)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # The traced copy starts from the same states as the original.
    traced_bi = traced.get_layer("bi")
    copied = [np.array(s) for layer in (traced_bi.forward_layer, traced_bi.backward_layer) for s in layer.rnn.states]
    for b, c in zip(before, copied):
        np.testing.assert_array_equal(c, b)


# Found by the fuzzer on Keras 3 (500-example run), kept as it was found.
MASK_OP_BEFORE_EMBEDDING = (
    {'flavour': None,
     'seed': 519,
     'batch': 3,
     'program': {'name': 'fuzz',
                 'ops': [{'op': 'input',
                          'name': 'in1',
                          'kind': 'tokens',
                          'time': 3,
                          'features': 4,
                          'static_time': True,
                          'padding': [[0, 0], [0, 3], [0, 1]]},
                         {'op': 'embedding',
                          'name': 'emb2',
                          'src': 0,
                          'input_dim': 4,
                          'output_dim': 4,
                          'mask_zero': True},
                         {'op': 'bidirectional',
                          'kind': 'lstm',
                          'name': 'bi3',
                          'src': 1,
                          'config': {'units': 3,
                                     'activation': 'tanh',
                                     'recurrent_activation': 'sigmoid',
                                     'use_bias': False,
                                     'unit_forget_bias': False,
                                     'bias_initializer': 'zeros',
                                     'dropout': 0.0,
                                     'recurrent_dropout': 0.0,
                                     'return_sequences': False,
                                     'return_state': True,
                                     'go_backwards': False},
                          'merge_mode': 'concat',
                          'initial_state': None},
                         {'op': 'dense', 'name': 'dense5', 'src': 6, 'units': 3, 'activation': 'linear'},
                         {'op': 'input',
                          'name': 'in6',
                          'kind': 'vector',
                          'time': None,
                          'features': 3,
                          'static_time': False,
                          'padding': []},
                         {'op': 'dense', 'name': 'dense7', 'src': 3, 'units': 3, 'activation': 'linear'},
                         {'op': 'bidirectional',
                          'kind': 'lstm',
                          'name': 'bi4',
                          'src': 1,
                          'config': {'units': 3,
                                     'activation': 'softsign',
                                     'recurrent_activation': 'hard_sigmoid',
                                     'use_bias': True,
                                     'unit_forget_bias': True,
                                     'bias_initializer': 'random_normal',
                                     'dropout': 0.0,
                                     'recurrent_dropout': 0.0,
                                     'return_sequences': True,
                                     'return_state': True,
                                     'go_backwards': False},
                          'merge_mode': None,
                          'initial_state': [7, 8, 5, 9]},
                         {'op': 'recurrent',
                          'kind': 'lstm',
                          'name': 'lstm8',
                          'src': 10,
                          'config': {'units': 2,
                                     'activation': 'hard_sigmoid',
                                     'recurrent_activation': 'tanh',
                                     'use_bias': False,
                                     'unit_forget_bias': False,
                                     'bias_initializer': 'zeros',
                                     'dropout': 0.0,
                                     'recurrent_dropout': 0.0,
                                     'return_sequences': True,
                                     'return_state': True,
                                     'go_backwards': False},
                          'initial_state': None},
                         {'op': 'bidirectional',
                          'kind': 'lstm',
                          'name': 'bi9',
                          'src': 11,
                          'config': {'units': 2,
                                     'activation': 'hard_sigmoid',
                                     'recurrent_activation': 'hard_sigmoid',
                                     'use_bias': True,
                                     'unit_forget_bias': True,
                                     'bias_initializer': 'random_normal',
                                     'dropout': 0.0,
                                     'recurrent_dropout': 0.0,
                                     'return_sequences': False,
                                     'return_state': True,
                                     'go_backwards': False},
                          'merge_mode': 'mul',
                          'initial_state': None},
                         {'op': 'concatenate', 'name': 'con10', 'srcs': [21, 21]},
                         {'op': 'add', 'name': 'add11', 'srcs': [8, 12]}],
                 'outputs': [2, 4, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 25]},
     'expose': {'states': ['gates'], 'layers': None, 'expose_masks': False, 'sample_inputs': False}}
)


@pytest.mark.backend_independent(
    reason="the bug was synthesize_inputs reading the functional graph's op order, one graph on every backend; "
           "test_fuzz.py runs check_spec on this backend")
def test_synthesized_ids_stay_below_the_embedding_input_dim(flavour):
    """Fuzzer, Keras 3: an Embedding(mask_zero) input also feeds the NotEqual op that computes its mask,
    and in this graph that op came first. synthesize_inputs took it for the input's consumer, drew ids
    up to 9 for an Embedding of input_dim 4, and the original model failed (GatherV2 out of range)."""
    spec = MASK_OP_BEFORE_EMBEDDING
    model, _ = fuzz_models.build(spec, flavour.name)
    tokens = synthesize_inputs(model)[0]
    assert tokens.dtype.kind == "i" and tokens.max() < 4
    fuzz_models.check_spec(spec, flavour.name)
