"""Conformance: every registered recurrent kind, on both Keras flavours, against tests/reference.py.

`REFERENCE_CASES` maps each kind of the registry (`lstm_rewrite.kinds.all_kinds()`) to its cases:
how to build a small layer of that kind and which NumPy reference computes its quantities. One
model per case and flavour holds the layer forwards, with ``go_backwards`` and inside
``Bidirectional``, on plain and on masked input; its traced copy exposes every quantity of the
kind (``states=("c", "h", "gates")``), and each exposed sequence must equal the reference: name,
time order, shape and values; so must the original outputs (what a masked step outputs follows
this run's Keras loop, `conftest.masked_output`). A kind registered without a case fails
`test_every_kind_has_a_case`; the traced model's original outputs must equal the original's.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable

import numpy as np
import pytest
from conftest import (
    masked_output,
    outputs_by_name,
    reference_gru,
    reference_lstm,
    reference_simple_rnn,
    run,
)
from test_recurrent_layers import counter_cell_class, reference_conv_lstm2d

import reference
from lstm_rewrite import expose_cell_states, kinds

BATCH, TIME = 3, 5
LSTM_QUANTITIES = ("c", "h", "i", "f", "g", "o")
GRU_QUANTITIES = ("h", "z", "r", "n")
# Keras 3's JAX loop fails on these originals when they are masked: mirror the skips of
# tests/test_recurrent_layers.py and tests/test_reference.py, with their reasons.
JAX_CUSTOM_CELL = ("Keras's own JAX loop cannot run the original masked RNN over a cell whose output is not its "
                   "states[0] (a broadcasting error in keras/src/backend/jax/rnn.py)")
JAX_CONV_LSTM = ("Keras 3's JAX loop cannot run a masked ConvLSTM2D: its mask does not broadcast over the "
                 "spatial axes (keras/src/backend/jax/rnn.py)")


@dataclasses.dataclass(frozen=True)
class Case:
    """One way to build a layer of a kind, and its NumPy reference.

    Attributes:
        name: the test id.
        build: ``build(flavour, name, go_backwards) -> layer``: a small recurrent layer with
            ``return_sequences=True`` and random biases.
        reference: ``reference(layer, x, flavour_name, mask=..., masked_output=...,
            zero_output_for_mask=...) -> dict``: the reference's sequences in processing order,
            each quantity and ``"output"``.
        quantities: what the layer exposes, in output order.
        step_shape: one input step's shape.
        method: the rewrite's ``method=``.
        jax_masked: why Keras 3 on JAX cannot run the original masked (None: it can).
        custom_objects: ``custom_objects(keras) -> {name: class}``, the custom classes Keras must
            find by name (``Bidirectional`` copies its layer through its config).
    """

    name: str
    build: Callable
    reference: Callable
    quantities: tuple
    step_shape: tuple = (3,)
    method: str = "trace"
    jax_masked: str | None = None
    custom_objects: Callable | None = None


def _bias(**kwargs):
    # Keras initialises biases to zero (the forget gate's to one): random ones test the bias path.
    return {"bias_initializer": "glorot_uniform", **kwargs}


def _rnn_over(cell):
    return lambda f, name, go_backwards: f.layers.RNN(cell(f), return_sequences=True, go_backwards=go_backwards,
                                                      name=name)


def _layer(cls, units, **kwargs):
    return lambda f, name, go_backwards: getattr(f.layers, cls)(
        units, return_sequences=True, go_backwards=go_backwards, name=name, **_bias(**kwargs))


def reference_stacked(layer, x, flavour_name, mask=None, masked_output="previous", zero_output_for_mask=False):
    """The cells of ``RNN(StackedRNNCells)`` one above the other, each with its own reference: the
    lowest reads the input (reversed with go_backwards), each higher one the sequence below it."""
    out, sequence, step_mask = {}, x, mask
    cells = layer.cell.cells
    for k, cell in enumerate(cells):
        own = types.SimpleNamespace(cell=cell, go_backwards=layer.go_backwards and k == 0)
        # What the stack outputs on a masked step is its top cell's: on JAX its carried h
        # (keras/src/backend/jax/rnn.py: "first state of last cell").
        top = {"masked_output": masked_output, "zero_output_for_mask": zero_output_for_mask} \
            if k == len(cells) - 1 else {}
        result = CELL_REFERENCES[type(cell).__name__](own, sequence, flavour_name, mask=step_mask, **top)
        out.update({f"cell{k}.{q}": v for q, v in result.items() if v.ndim == 3 and q != "output"})
        sequence = result["output"]
        if k == 0 and layer.go_backwards and step_mask is not None:
            step_mask = step_mask[:, ::-1]  # the higher cells read the lowest one's processing order
    out["output"] = sequence
    return out


def reference_counter(layer, x, flavour_name, **kwargs):
    cell = layer.cell
    return reference.counter_cell(x, *(np.asarray(t.numpy()) for t in (cell.w, cell.u, cell.v, cell.p)),
                                  go_backwards=layer.go_backwards, **kwargs)


# One CounterCell class per Keras flavour, so that Keras finds the class the model's layers are of.
counter_cell = functools.cache(counter_cell_class)

CELL_REFERENCES = {"LSTMCell": reference_lstm, "GRUCell": reference_gru, "SimpleRNNCell": reference_simple_rnn}

# Kind name -> its cases. A kind added to the registry needs a case here (and, for new step math,
# a reference function in tests/reference.py written from its equations).
REFERENCE_CASES: dict[str, tuple[Case, ...]] = {
    "lstm": (
        Case("LSTM", _layer("LSTM", 3), reference_lstm, LSTM_QUANTITIES),
        Case("RNN(LSTMCell)", _rnn_over(lambda f: f.layers.LSTMCell(3, **_bias())), reference_lstm,
             LSTM_QUANTITIES),
        # The kind's fast path: Keras's own LSTM for h, c and the gates rebuilt from it.
        Case("LSTM-reconstruct", _layer("LSTM", 3), reference_lstm, LSTM_QUANTITIES, method="reconstruct"),
    ),
    "gru": (
        Case("GRU", _layer("GRU", 3), reference_gru, GRU_QUANTITIES),
        Case("RNN(GRUCell)", _rnn_over(lambda f: f.layers.GRUCell(3, reset_after=False, **_bias())), reference_gru,
             GRU_QUANTITIES),
    ),
    "simple_rnn": (
        Case("SimpleRNN", _layer("SimpleRNN", 3), reference_simple_rnn, ("h",)),
        Case("RNN(SimpleRNNCell)", _rnn_over(lambda f: f.layers.SimpleRNNCell(3, **_bias())), reference_simple_rnn,
             ("h",)),
    ),
    "conv_lstm": (
        Case("ConvLSTM2D", _layer("ConvLSTM2D", 2, kernel_size=2, padding="same"), reference_conv_lstm2d,
             LSTM_QUANTITIES, step_shape=(3, 3, 1), jax_masked=JAX_CONV_LSTM),
    ),
    "stacked": (
        Case("RNN(StackedRNNCells)",
             _rnn_over(lambda f: f.layers.StackedRNNCells([f.layers.LSTMCell(2, **_bias()),
                                                           f.layers.GRUCell(2, **_bias())])),
             reference_stacked,
             tuple(f"cell0.{q}" for q in LSTM_QUANTITIES) + tuple(f"cell1.{q}" for q in GRU_QUANTITIES)),
    ),
    "generic": (
        Case("RNN(CounterCell)", _rnn_over(lambda f: counter_cell(f.keras)(2)), reference_counter,
             ("state0", "state1"), jax_masked=JAX_CUSTOM_CELL,
             custom_objects=lambda keras: {"CounterCell": counter_cell(keras)}),
    ),
}


def test_every_kind_has_a_case():
    missing = [k.name for k in kinds.all_kinds() if not REFERENCE_CASES.get(k.name)]
    assert not missing, (
        f"The recurrent kind(s) {missing} are registered in lstm_rewrite.kinds but have no reference case: add one "
        f"to REFERENCE_CASES in tests/test_conformance.py (a small layer of the kind and the tests/reference.py "
        f"function that computes its quantities from its equations).")
    unknown = sorted(set(REFERENCE_CASES) - {k.name for k in kinds.all_kinds()})
    assert not unknown, f"REFERENCE_CASES names kinds the registry does not have: {unknown}"


def test_cases_expose_what_the_registry_says():
    """A fixed kind's case lists its kind's quantities; a stack's, each cell's kind's under cellK."""
    for name, cases in REFERENCE_CASES.items():
        kind = kinds.get(name)
        for case in cases:
            if kind.numbered:
                assert case.quantities == kind.with_states(len(case.quantities)).quantities, case.name
            elif kind.quantities:
                assert case.quantities == kind.quantities, case.name


CASES = [pytest.param(case, id=case.name) for name in REFERENCE_CASES for case in REFERENCE_CASES[name]]


# --- one model per case and flavour, shared by its tests -----------------------------------------


def step_masking_class(keras):
    """Masking's rule over every feature axis: a step is valid when any of its values is nonzero
    (Masking looks at the last axis only, which for ConvLSTM frames gives a mask per pixel row)."""
    ops = keras.ops if hasattr(keras, "ops") else None

    class StepMasking(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True

        def call(self, inputs):
            # A new tensor: Keras 3 attaches the mask to what call returns, and the input itself
            # also feeds the unmasked branches.
            return inputs * 1.0

        def compute_mask(self, inputs, mask=None):
            if ops is None:  # tf-keras
                import tensorflow as tf

                return tf.reduce_any(tf.not_equal(inputs, 0.0), axis=list(range(2, inputs.shape.rank)))
            return ops.any(ops.not_equal(inputs, 0.0), axis=tuple(range(2, len(inputs.shape))))

    return StepMasking


@dataclasses.dataclass
class Traced:
    model: object
    traced: object
    x: np.ndarray
    mask: np.ndarray
    original: list  # the original model's outputs on x
    named: dict  # the traced model's outputs on x, by name
    masked: bool  # whether the model has the masked branches


_TRACED: dict = {}


def build_model(flavour, case: Case, masked: bool):
    """One input feeding the case's layer forwards ("fwd"), with go_backwards ("back") and in a
    Bidirectional ("bi"); with ``masked``, also a go_backwards one ("mback") and a Bidirectional
    ("mbi") on the input masked where a step is all zeros."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((None, *case.step_shape), name="x")
    branches = [
        case.build(flavour, "fwd", False)(inputs),
        case.build(flavour, "back", True)(inputs),
        layers.Bidirectional(case.build(flavour, "bi_inner", False), name="bi")(inputs),
    ]
    if masked:
        padded = step_masking_class(keras)(name="step_mask")(inputs)
        branches.append(case.build(flavour, "mback", True)(padded))
        branches.append(layers.Bidirectional(case.build(flavour, "mbi_inner", False), name="mbi")(padded))
    return keras.Model(inputs, branches)


def traced_case(flavour, case: Case) -> Traced:
    """The case's model, traced, run once; built on first use per flavour (the tests share it)."""
    key = (flavour.name, case.name)
    if key not in _TRACED:
        keras = flavour.keras
        masked = not (case.jax_masked and masked_output(flavour.name) == "state0")
        custom = case.custom_objects(keras) if case.custom_objects else {}
        with keras.utils.custom_object_scope(custom):
            model = build_model(flavour, case, masked)
            traced = expose_cell_states(model, states=("c", "h", "gates"), verify=False, method=case.method)
        rng = np.random.default_rng(17)
        x = rng.standard_normal((BATCH, TIME, *case.step_shape)).astype("float32")
        x[1, TIME - 2:] = 0.0  # trailing padding
        x[2, :2] = 0.0  # leading padding: the initial state before the first valid step
        mask = np.any(x != 0, axis=tuple(range(2, x.ndim)))
        _TRACED[key] = Traced(model, traced, x, mask, run(model, x), outputs_by_name(traced, x), masked)
    return _TRACED[key]


def masking(flavour_name: str, mask) -> dict:
    """The reference's masking arguments: ``mask`` and what a masked step outputs on this run
    (`conftest.masked_output`; without a mask nothing is masked)."""
    return {"mask": mask, "masked_output": "previous" if mask is None else masked_output(flavour_name)}


def check_sites(t: Traced, case: Case, flavour_name: str, sites: dict, mask):
    """Each site (name -> (layer, time order)) exposes the case's quantities, in order, equal to the
    reference; a Bidirectional's backward half is aligned with input time."""
    record = {e.name: e for e in t.traced.rewrite_record.exposed}
    for site, (layer, time_order) in sites.items():
        names = [f"{site}.{q}" for q in case.quantities]
        assert [n for n in record if n.startswith(f"{site}.")] == names, site
        assert {record[n].time_order for n in names} == {time_order}, site
        expected = case.reference(layer, t.x, flavour_name, **masking(flavour_name, mask))
        assert set(case.quantities) <= set(expected), f"{case.name}: the reference lacks some quantity"
        for q in case.quantities:
            want = expected[q][:, ::-1] if time_order == "backward_aligned" else expected[q]
            got = t.named[f"{site}.{q}"]
            assert got.shape == want.shape, f"{site}.{q}: shape {got.shape} != reference {want.shape}"
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f"{case.name}: {site}.{q}")


def zero_output_for_mask(layer, flavour_name: str, case: Case) -> bool:
    """Whether masked steps output zeros: Bidirectional sets its halves' ``zero_output_for_mask``,
    which tf-keras's ConvLSTM ignores (tf_keras/src/layers/rnn/base_conv_rnn.py never passes it on)."""
    return bool(layer.zero_output_for_mask) and not (flavour_name == "tfkeras" and case.name.startswith("ConvLSTM"))


def check_outputs(t: Traced, case: Case, flavour_name: str, branches: dict, mask):
    """The original outputs equal the reference's (on masked steps what this run's Keras loop
    outputs: `conftest.masked_output`), and the traced model's original outputs are the original's."""
    names = list(t.model.output_names)
    for branch, layer in branches.items():
        halves = layer if isinstance(layer, tuple) else (layer,)
        wants = [case.reference(half, t.x, flavour_name, **masking(flavour_name, mask),
                                zero_output_for_mask=zero_output_for_mask(half, flavour_name, case))["output"]
                 for half in halves]
        # Bidirectional concatenates its forward output and its backward one aligned with input time.
        want = wants[0] if len(wants) == 1 else np.concatenate([wants[0], wants[1][:, ::-1]], axis=-1)
        np.testing.assert_allclose(t.original[names.index(branch)], want, atol=1e-5, rtol=1e-4,
                                   err_msg=f"{case.name}: {branch}")
    for branch in branches:
        np.testing.assert_allclose(t.named[branch], t.original[names.index(branch)], atol=1e-6,
                                   err_msg=f"{case.name}: the traced model's output {branch!r}")


@pytest.mark.parametrize("case", CASES)
def test_unmasked_go_backwards_and_bidirectional(flavour, case):
    t = traced_case(flavour, case)
    model = t.model
    bi = model.get_layer("bi")
    check_sites(t, case, flavour.name, {
        "fwd": (model.get_layer("fwd"), "forward"),
        "back": (model.get_layer("back"), "go_backwards"),
        "bi.forward": (bi.forward_layer, "forward"),
        "bi.backward": (bi.backward_layer, "backward_aligned"),
    }, mask=None)
    check_outputs(t, case, flavour.name, {"fwd": model.get_layer("fwd"), "back": model.get_layer("back"),
                                          "bi": (bi.forward_layer, bi.backward_layer)}, mask=None)


@pytest.mark.parametrize("case", CASES)
def test_masked_go_backwards_and_bidirectional(flavour, case):
    if case.jax_masked and masked_output(flavour.name) == "state0":
        pytest.skip(case.jax_masked)
    t = traced_case(flavour, case)
    model = t.model
    bi = model.get_layer("mbi")
    check_sites(t, case, flavour.name, {
        "mback": (model.get_layer("mback"), "go_backwards"),
        "mbi.forward": (bi.forward_layer, "forward"),
        "mbi.backward": (bi.backward_layer, "backward_aligned"),
    }, mask=t.mask)
    check_outputs(t, case, flavour.name, {"mback": model.get_layer("mback"),
                                          "mbi": (bi.forward_layer, bi.backward_layer)}, mask=t.mask)
