"""Random functional models for the property tests: a plain-data spec, its model in either Keras flavour,
a NumPy interpreter of the spec, and the checks every generated model must pass.

A *spec* holds only plain values, so that hypothesis prints a failing one and it can be pasted, as it
is, into tests/test_regressions.py::

    {"seed": 3, "batch": 3,
     "program": {"name": "fuzz", "ops": [...], "outputs": [4, 6]},
     "expose": {"states": ["c", "h"], "layers": None, "expose_masks": True, "sample_inputs": True}}

A *program* is a list of ops; each op produces one or more values, numbered in order of creation,
and refers to earlier values by number. Ops (every one has "op" and most a unique "name"):

- ``input``: a model input. ``kind`` "tokens" (int ids, ``[batch, time]``), "float"
  (``[batch, time, features]``) or "vector" (``[batch, features]``, for initial states); ``time``
  (steps of the generated data), ``static_time`` (the Input declares it), ``features``, ``padding``
  (``[lead, trail]`` padded steps per batch row).
- ``embedding`` (``input_dim``, ``output_dim``, ``mask_zero``), ``masking`` (``mask_value``),
  ``dense`` (``units``, ``activation``), ``add`` / ``concatenate`` (``srcs``), ``last_step``.
- ``recurrent``: a recurrent layer of kind ``kind`` (see `RECURRENT_KINDS`) with ``config``, called on
  ``src`` with ``initial_state`` (value numbers or None). ``bidirectional``: the same layer wrapped in
  ``Bidirectional`` with ``merge_mode``.
- ``call``: call again the recurrent layer, Bidirectional or nested model named ``target`` (created
  earlier in the same program) on ``src``: a shared layer.
- ``nested``: a nested functional model made of ``program`` (whose first op is its one input), called
  on ``src``.

The interpreter (`interpret`) computes, with tests/reference.py, every value, every mask Keras attaches
to it, and every recurrent call's per-step states, in float64. It is checked against the model's own
outputs before it is trusted as the oracle for the exposed states.

Other recurrent layer kinds plug in by adding a `RecurrentKind` to `RECURRENT_KINDS`: how to draw its
config, how to build it, what its state list is, and how tests/reference.py runs it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

import numpy as np
from hypothesis import strategies as st

import reference
from conftest import Untouched, activation_name, keras_of, run

# ------------------------------------------------------------------------------------------------
# Recurrent layer kinds
# ------------------------------------------------------------------------------------------------

#: Activations that both flavours know by name, with the same meaning in tests/reference.py.
ACTIVATIONS = ("tanh", "relu", "softsign", "sigmoid", "linear", "elu", "hard_sigmoid")
RECURRENT_ACTIVATIONS = ("sigmoid", "hard_sigmoid", "tanh", "softsign")


@dataclasses.dataclass(frozen=True)
class RecurrentKind:
    """How the fuzzer draws, builds and checks one kind of recurrent layer.

    Attributes:
        name: the spec's ``kind`` ("lstm").
        layer_class: the Keras class name (the same in both flavours).
        quantities: what ``expose_cell_states`` can expose for it, in output order.
        gates: the quantities ``states=("gates",)`` stands for on this kind.
        state_names: its state list, in ``return_state`` / ``initial_state`` order.
        draw_cell_config: ``draw -> dict`` of the cell's own arguments (units, activations, ...).
        reference: ``(layer, x, mask, initial_state, flavour, zero_output_for_mask) -> dict`` from
            tests/reference.py: every quantity in processing order, ``output``, ``last_output``,
            ``last_<state>`` and ``mask``.
    """

    name: str
    layer_class: str
    quantities: tuple
    gates: tuple
    state_names: tuple
    draw_cell_config: Callable
    reference: Callable

    def build(self, keras, config: dict, name: str | None = None):
        return getattr(keras.layers, self.layer_class)(**config, name=name)


def _draw_lstm_config(draw) -> dict:
    return {
        "units": draw(st.integers(1, 4)),
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "recurrent_activation": draw(st.sampled_from(RECURRENT_ACTIVATIONS)),
        "use_bias": draw(st.booleans()),
        "unit_forget_bias": draw(st.booleans()),
        "bias_initializer": draw(st.sampled_from(["zeros", "random_normal"])),
        # Dropout only acts in training: the traced model must ignore it at inference, as Keras does.
        "dropout": draw(st.sampled_from([0.0, 0.0, 0.0, 0.25])),
        "recurrent_dropout": draw(st.sampled_from([0.0, 0.0, 0.0, 0.25])),
    }


def _lstm_reference(layer, x, mask, initial_state, flavour, zero_output_for_mask):
    cell = layer.cell
    bias = np.asarray(cell.bias.numpy()) if cell.use_bias else None
    return reference.lstm(
        x, np.asarray(cell.kernel.numpy()), np.asarray(cell.recurrent_kernel.numpy()), bias,
        mask=mask, go_backwards=layer.go_backwards, initial_state=initial_state,
        activation=activation_name(cell.activation), recurrent_activation=activation_name(cell.recurrent_activation),
        flavour=flavour, zero_output_for_mask=zero_output_for_mask,
    )


LSTM_KIND = RecurrentKind("lstm", "LSTM", ("c", "h", "i", "f", "g", "o"), ("i", "f", "g", "o"), ("h", "c"),
                          _draw_lstm_config, _lstm_reference)

#: The recurrent kinds the generator draws from, by spec name.
RECURRENT_KINDS: dict[str, RecurrentKind] = {"lstm": LSTM_KIND}

MERGE_MODES = ("concat", "sum", "ave", "mul", None)


# ------------------------------------------------------------------------------------------------
# Drawing a spec
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Value:
    rank: str  # "ids" (token input), "seq" [batch, time, f], "vec" [batch, f]
    features: int
    time: int | None = None


@dataclasses.dataclass
class _Budget:
    recurrent: int  # recurrent layers still to create (Bidirectional counts as one)
    ops: int
    counter: int = 0

    def name(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"


class _ProgramDrawer:
    """Draws one program (a model level); nested models draw their own with a shared budget."""

    def __init__(self, draw, budget: _Budget, kinds: tuple, depth: int, top: bool, flavour: str | None):
        self.draw, self.budget, self.kinds, self.depth, self.top = draw, budget, kinds, depth, top
        self.flavour = flavour
        self.ops: list = []
        self.values: list[_Value] = []
        self.producers: list[str] = []  # the op kind that made each value
        self.consumed: set = set()
        self.created: dict = {}  # layer or nested model name -> {"op", "in_features", "results" (nested)}
        self.batch = 2  # set by model_specs; nested programs take their parent's

    # -- helpers ------------------------------------------------------------------------------

    def add(self, op, results) -> list[int]:
        self.ops.append(op)
        first = len(self.values)
        self.values.extend(results)
        self.producers.extend(op["op"] for _ in results)
        self.budget.ops -= 1
        return list(range(first, len(self.values)))

    def use(self, *ids):
        self.consumed.update(i for i in ids if i is not None)

    def pick(self, predicate) -> int | None:
        """A value satisfying ``predicate``, unconsumed ones first (so every branch tends to be used)."""
        ids = [i for i, v in enumerate(self.values) if predicate(v)]
        if not ids:
            return None
        ids.sort(key=lambda i: (i in self.consumed, -i))
        return self.draw(st.sampled_from(ids))

    def seq(self):
        return self.pick(lambda v: v.rank == "seq")

    # -- ops ----------------------------------------------------------------------------------

    def input(self, kind, time, features, static_time, with_padding=True):
        draw, batch = self.draw, self.batch
        padding = []
        if with_padding and kind != "vector":
            for row in range(batch):
                lead = draw(st.integers(0, 1)) if row == batch - 1 else 0
                trail = draw(st.integers(0, time - lead)) if row > 0 else 0
                padding.append([lead, trail])
        op = {"op": "input", "name": self.budget.name("in"), "kind": kind, "time": time, "features": features,
              "static_time": static_time, "padding": padding}
        rank = {"tokens": "ids", "float": "seq", "vector": "vec"}[kind]
        return self.add(op, [_Value(rank, features, None if kind == "vector" else time)])[0]

    def dense(self, src, units=None):
        draw = self.draw
        value = self.values[src]
        units = units or draw(st.integers(1, 4))
        op = {"op": "dense", "name": self.budget.name("dense"), "src": src, "units": units,
              "activation": draw(st.sampled_from(["linear", "tanh", "relu"]))}
        self.use(src)
        return self.add(op, [_Value(value.rank, units, value.time)])[0]

    def initial_state(self, sizes):
        """Value numbers for an initial state of the given sizes, or None."""
        draw = self.draw
        vectors = [i for i, v in enumerate(self.values) if v.rank == "vec"]
        if draw(st.integers(0, 3)) != 0:  # one call in four gets an initial state
            return None
        if not vectors and not self.top:
            return None
        ids = []
        for size in sizes:
            matching = [i for i in vectors if self.values[i].features == size]
            how = draw(st.sampled_from(["reuse", "project", "input"]))
            if how == "reuse" and matching:
                ids.append(draw(st.sampled_from(matching)))
            elif (how == "project" or not self.top) and vectors:
                ids.append(self.dense(draw(st.sampled_from(vectors)), units=size))
            elif self.top:
                ids.append(self.input("vector", None, size, False))
            else:
                return None
        self.use(*ids)
        return ids

    def recurrent(self, bidirectional: bool):
        draw = self.draw
        src = self.seq()
        kind = RECURRENT_KINDS[draw(st.sampled_from(self.kinds))]
        config = kind.draw_cell_config(draw)
        # Keras 3 refuses Bidirectional(LSTM(go_backwards=True)); tf-keras runs it with swapped directions.
        allowed = not bidirectional or self.flavour == "tfkeras"
        backwards = allowed and draw(st.integers(0, 5 if bidirectional else 2)) == 0
        config.update(return_sequences=draw(st.booleans()), return_state=draw(st.booleans()), go_backwards=backwards)
        if not bidirectional and draw(st.integers(0, 5)) == 0:
            config["zero_output_for_mask"] = True
        units = config["units"]
        op = {"op": "bidirectional" if bidirectional else "recurrent", "kind": kind.name,
              "name": self.budget.name("bi" if bidirectional else kind.name), "src": src, "config": config}
        if bidirectional:
            op["merge_mode"] = draw(st.sampled_from(MERGE_MODES))
        self.use(src)
        op["initial_state"] = self.initial_state([units] * len(kind.state_names) * (2 if bidirectional else 1))
        results = self._recurrent_results(op, self.values[src].time)
        self.budget.recurrent -= 1
        ids = self.add(op, results)
        self.created[op["name"]] = {"op": op, "in_features": self.values[src].features}
        return ids

    def _recurrent_results(self, op, time):
        kind = RECURRENT_KINDS[op["kind"]]
        config = op["config"]
        units = config["units"]
        width = units
        if op["op"] == "bidirectional" and op["merge_mode"] == "concat":
            width = 2 * units
        main = _Value("seq", width, time) if config["return_sequences"] else _Value("vec", width)
        merged = [main, dataclasses.replace(main)] if op["op"] == "bidirectional" and op["merge_mode"] is None \
            else [main]
        states = [_Value("vec", units) for _ in kind.state_names] if config["return_state"] else []
        if op["op"] == "bidirectional":
            states = states * 2
        return merged + [dataclasses.replace(s) for s in states]

    def call_again(self):
        draw = self.draw
        targets = [n for n, c in self.created.items()
                   if any(v.rank == "seq" and v.features == c["in_features"] for v in self.values)]
        if not targets:
            return None
        name = draw(st.sampled_from(targets))
        target = self.created[name]
        src = self.pick(lambda v: v.rank == "seq" and v.features == target["in_features"])
        op = {"op": "call", "target": name, "src": src, "initial_state": None}
        self.use(src)
        time = self.values[src].time
        target_op = target["op"]
        if target_op["op"] == "nested":
            results = [dataclasses.replace(v, time=time if v.rank == "seq" else None) for v in target["results"]]
        else:
            kind = RECURRENT_KINDS[target_op["kind"]]
            count = len(kind.state_names) * (2 if target_op["op"] == "bidirectional" else 1)
            op["initial_state"] = self.initial_state([target_op["config"]["units"]] * count)
            results = self._recurrent_results(target_op, time)
        return self.add(op, results)

    def merge(self):
        draw = self.draw
        first = self.pick(lambda v: v.rank in ("seq", "vec"))
        a = self.values[first]
        how = draw(st.sampled_from(["add", "concatenate"]))
        if how == "add":
            second = self.pick(lambda v: v.rank == a.rank and v.features == a.features and v.time == a.time)
            features = a.features
        else:
            second = self.pick(lambda v: v.rank == a.rank and v.time == a.time)
            features = a.features + self.values[second].features
        op = {"op": how, "name": self.budget.name(how[:3]), "srcs": [first, second]}
        self.use(first, second)
        return self.add(op, [_Value(a.rank, features, a.time)])

    def last_step(self):
        src = self.seq()
        self.use(src)
        return self.add({"op": "last_step", "src": src}, [_Value("vec", self.values[src].features)])

    def nested(self):
        draw = self.draw
        src = self.seq()
        value = self.values[src]
        name = self.budget.name("nest")
        inner = _ProgramDrawer(draw, self.budget, self.kinds, self.depth + 1, top=False, flavour=self.flavour)
        inner.batch = self.batch
        inner.input("float", None, value.features, False, with_padding=False)
        inner.body(draw(st.integers(0, min(2, self.budget.recurrent))))
        program = inner.finish(name)
        op = {"op": "nested", "name": name, "src": src, "program": program}
        self.use(src)
        results = [dataclasses.replace(inner.values[i], time=value.time if inner.values[i].rank == "seq" else None)
                   for i in program["outputs"]]
        self.created[name] = {"op": op, "in_features": value.features, "results": results}
        return self.add(op, results)

    # -- a program ----------------------------------------------------------------------------

    def body(self, recurrent_target: int):
        draw = self.draw
        made, attempts = 0, 0
        while made < recurrent_target and self.budget.ops > 0 and attempts < 40:
            attempts += 1
            choices = ["recurrent"] * 4 + ["bidirectional"] * 2 + ["dense", "merge", "last_step"]
            if self.created:
                choices.append("call")
            if self.depth == 0 and self.budget.recurrent >= 1:
                choices.append("nested")
            if not any(v.rank == "seq" for v in self.values):
                choices = [c for c in choices if c in ("dense", "merge")] or ["dense"]
            choice = draw(st.sampled_from(choices))
            if choice in ("recurrent", "bidirectional"):
                if self.budget.recurrent <= 0:
                    continue
                self.recurrent(choice == "bidirectional")
                made += 1
            elif choice == "dense":
                self.dense(self.pick(lambda v: v.rank in ("seq", "vec")))
            elif choice == "merge":
                self.merge()
            elif choice == "last_step":
                self.last_step()
            elif choice == "call":
                self.call_again()
            elif choice == "nested":
                before = self.budget.recurrent
                self.nested()
                made += before - self.budget.recurrent
        # A few more ops after the last recurrent layer: branches and merges around the states.
        for _ in range(draw(st.integers(0, 2))):
            if self.budget.ops <= 0:
                break
            choice = draw(st.sampled_from(["dense", "merge", "last_step"]))
            if choice == "last_step" and not any(v.rank == "seq" for v in self.values):
                choice = "dense"
            getattr(self, {"dense": "dense_any", "merge": "merge", "last_step": "last_step"}[choice])()

    def dense_any(self):
        return self.dense(self.pick(lambda v: v.rank in ("seq", "vec")))

    def finish(self, name: str) -> dict:
        """The program; every value nothing consumes becomes an output (an unused input gets a Dense)."""
        input_ids = [i for i, kind in enumerate(self.producers) if kind == "input"]
        for i in input_ids:
            if i not in self.consumed:
                self.dense(i)
        outputs = [i for i in range(len(self.values)) if i not in self.consumed and i not in input_ids]
        return {"name": name, "ops": self.ops, "outputs": outputs}


def _result_count(op, ops_by_name) -> int:
    """How many values an op produces."""
    kind = op["op"]
    if kind == "call":
        return _result_count(ops_by_name[op["target"]], ops_by_name)
    if kind == "nested":
        return len(op["program"]["outputs"])
    if kind in ("recurrent", "bidirectional"):
        config = op["config"]
        merged = 2 if kind == "bidirectional" and op["merge_mode"] is None else 1
        states = len(RECURRENT_KINDS[op["kind"]].state_names) * (2 if kind == "bidirectional" else 1)
        return merged + (states if config["return_state"] else 0)
    return 1


@st.composite
def model_specs(draw, flavour: str | None = None, kinds: tuple = tuple(RECURRENT_KINDS), max_recurrent: int = 4):
    """A hypothesis strategy for model specs with 1 to ``max_recurrent`` recurrent layers of ``kinds``.

    ``flavour`` allows what only that flavour can build (None: what both can).

    Example:
        >>> @given(model_specs())
        ... def test_something(spec): ...
    """
    recurrent = draw(st.integers(1, max_recurrent))
    budget = _Budget(recurrent=recurrent, ops=16)
    drawer = _ProgramDrawer(draw, budget, tuple(kinds), depth=0, top=True, flavour=flavour)
    drawer.batch = draw(st.integers(2, 3))
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["tokens", "float"]))
        time = draw(st.integers(2, 6))
        static = draw(st.booleans())
        if kind == "tokens":
            ids = drawer.input("tokens", time, draw(st.integers(3, 9)), static)
            op = {"op": "embedding", "name": budget.name("emb"), "src": ids, "input_dim": drawer.ops[-1]["features"],
                  "output_dim": draw(st.integers(1, 4)), "mask_zero": draw(st.booleans())}
            drawer.use(ids)
            drawer.add(op, [_Value("seq", op["output_dim"], time)])
        else:
            x = drawer.input("float", time, draw(st.integers(1, 4)), static)
            if draw(st.booleans()):
                op = {"op": "masking", "name": budget.name("mask"), "src": x,
                      "mask_value": draw(st.sampled_from([0.0, -1.0]))}
                drawer.use(x)
                drawer.add(op, [_Value("seq", drawer.values[x].features, time)])
    drawer.body(recurrent)
    program = drawer.finish("fuzz")
    names = _recurrent_names(program)
    states = draw(st.lists(st.sampled_from(["c", "h", "i", "f", "g", "o", "gates"]), min_size=1, max_size=3,
                           unique=True))
    layers = None
    if draw(st.integers(0, 3)) == 0:
        layers = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    return {
        "flavour": flavour,
        "seed": draw(st.integers(0, 2**16)),
        "batch": drawer.batch,
        "program": program,
        "expose": {"states": states, "layers": layers, "expose_masks": draw(st.booleans()),
                   "sample_inputs": draw(st.booleans())},
    }


def _recurrent_names(program) -> list[str]:
    """Names of the recurrent layers and nested models of a program, at every depth."""
    names = []
    for op in program["ops"]:
        if op["op"] in ("recurrent", "bidirectional"):
            names.append(op["name"])
        elif op["op"] == "nested":
            if _recurrent_names(op["program"]):
                names.append(op["name"])
            names += _recurrent_names(op["program"])
    return names


# ------------------------------------------------------------------------------------------------
# Building the Keras model
# ------------------------------------------------------------------------------------------------


def build(spec, flavour: str):
    """The model of ``spec`` in ``flavour``; returns ``(model, objects)`` with every named layer/model."""
    keras = keras_of(flavour)
    keras.backend.clear_session()
    keras.utils.set_random_seed(spec["seed"])
    objects = {}
    model = _build_program(keras, spec["program"], objects)
    return model, objects


def _build_program(keras, program, objects):
    layers = keras.layers
    values, inputs = [], []
    ops_by_name = {op["name"]: op for op in program["ops"] if "name" in op}

    def call_recurrent(layer, op, src, initial_state):
        x = values[src]
        if initial_state is not None:
            out = layer(x, initial_state=[values[i] for i in initial_state])
        else:
            out = layer(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    for op in program["ops"]:
        kind = op["op"]
        if kind == "input":
            if op["kind"] == "tokens":
                tensor = keras.Input((op["time"] if op["static_time"] else None,), dtype="int32", name=op["name"])
            elif op["kind"] == "float":
                tensor = keras.Input((op["time"] if op["static_time"] else None, op["features"]), name=op["name"])
            else:
                tensor = keras.Input((op["features"],), name=op["name"])
            inputs.append(tensor)
            results = [tensor]
        elif kind == "embedding":
            layer = layers.Embedding(op["input_dim"], op["output_dim"], mask_zero=op["mask_zero"], name=op["name"],
                                     embeddings_initializer="random_normal")
            objects[op["name"]] = layer
            results = [layer(values[op["src"]])]
        elif kind == "masking":
            results = [layers.Masking(op["mask_value"], name=op["name"])(values[op["src"]])]
        elif kind == "dense":
            layer = layers.Dense(op["units"], activation=op["activation"], name=op["name"],
                                 bias_initializer="random_normal")
            objects[op["name"]] = layer
            results = [layer(values[op["src"]])]
        elif kind == "add":
            results = [layers.Add(name=op["name"])([values[i] for i in op["srcs"]])]
        elif kind == "concatenate":
            results = [layers.Concatenate(name=op["name"])([values[i] for i in op["srcs"]])]
        elif kind == "last_step":
            results = [values[op["src"]][:, -1]]
        elif kind == "recurrent":
            layer = RECURRENT_KINDS[op["kind"]].build(keras, op["config"], op["name"])
            objects[op["name"]] = layer
            results = call_recurrent(layer, op, op["src"], op["initial_state"])
        elif kind == "bidirectional":
            inner = RECURRENT_KINDS[op["kind"]].build(keras, op["config"])
            layer = layers.Bidirectional(inner, merge_mode=op["merge_mode"], name=op["name"])
            objects[op["name"]] = layer
            results = call_recurrent(layer, op, op["src"], op["initial_state"])
        elif kind == "call":
            target = objects[op["target"]]
            if ops_by_name[op["target"]]["op"] == "nested":
                out = target(values[op["src"]])
                results = list(out) if isinstance(out, (list, tuple)) else [out]
            else:
                results = call_recurrent(target, op, op["src"], op["initial_state"])
        elif kind == "nested":
            inner = _build_program(keras, op["program"], objects)
            objects[op["name"]] = inner
            out = inner(values[op["src"]])
            results = list(out) if isinstance(out, (list, tuple)) else [out]
        else:
            raise AssertionError(op)
        values.extend(results)
    outputs = [values[i] for i in program["outputs"]]
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0],
                       name=program["name"])


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def make_inputs(spec):
    """The batch the model of ``spec`` is checked on: padded steps hold id 0 or the mask value."""
    rng = np.random.default_rng(spec["seed"])
    batch = spec["batch"]
    mask_values = {op["src"]: op["mask_value"] for op in spec["program"]["ops"] if op["op"] == "masking"}
    arrays = []
    value_id = 0
    ops_by_name = {op["name"]: op for op in spec["program"]["ops"] if "name" in op}
    for op in spec["program"]["ops"]:
        if op["op"] == "input":
            if op["kind"] == "tokens":
                array = rng.integers(1, op["features"], size=(batch, op["time"])).astype("int32")
                pad = 0
            elif op["kind"] == "float":
                array = rng.standard_normal((batch, op["time"], op["features"])).astype("float32")
                pad = mask_values.get(value_id, 0.0)
            else:
                array = rng.standard_normal((batch, op["features"])).astype("float32")
            for row, (lead, trail) in enumerate(op["padding"]):
                array[row, :lead] = pad
                array[row, op["time"] - trail:] = pad
            arrays.append(array)
        value_id += _result_count(op, ops_by_name)
    return arrays if len(arrays) > 1 else arrays[0]


# ------------------------------------------------------------------------------------------------
# The NumPy interpreter: every value, mask and recurrent state of a spec
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExpectedSite:
    """One direction of one recurrent call, as the interpreter computed it."""

    site: str  # the dotted name the library gives it, e.g. "bi1.backward" or "nest3.call1.lstm4"
    layer_names: tuple  # names that select it with layers=[...] (the layer and enclosing nested models)
    kind: RecurrentKind
    result: dict  # tests/reference.py's result, 3-D sequences already in the library's time order


def _merge_mask(kind, masks, flavour):
    """The mask Keras gives the output of Add / Concatenate.

    The flavours differ: tf-keras keeps a step when every masked input keeps it (AND, an unmasked
    input counting as all-valid); Keras 3 keeps it when any input keeps it (OR), and Add drops the
    mask altogether when one input has none (keras/src/layers/merging/{base_merge,concatenate}.py).
    """
    if all(m is None for m in masks):
        return None
    if flavour == "tfkeras":
        present = [m for m in masks if m is not None]
        return np.logical_and.reduce(present)
    if kind == "add" and any(m is None for m in masks):
        return None
    filled = [np.ones_like(next(m for m in masks if m is not None)) if m is None else m for m in masks]
    return np.logical_or.reduce(filled)


def interpret(spec, objects, data, flavour: str):
    """Run ``spec`` in NumPy on ``data``: returns ``(outputs, sites)``.

    ``outputs``: the model's outputs (float64); ``sites``: a list of `ExpectedSite`, one per
    direction of every recurrent call at every depth.
    """
    arrays = data if isinstance(data, list) else [data]
    sites: list = []
    inputs = [(np.asarray(a), None) for a in arrays]
    outputs = _interpret_program(spec["program"], objects, inputs, flavour, prefix="", owners=(), sites=sites)
    return [value for value, _ in outputs], sites


def _interpret_program(program, objects, inputs, flavour, prefix, owners, sites):
    values = []  # (array float64 or int ids, mask or None)
    pending_inputs = list(inputs)
    calls: dict = {}  # layer name -> calls so far at this level
    ops_by_name = {op["name"]: op for op in program["ops"] if "name" in op}

    def site_of(name):
        index = calls.get(name, 0)
        calls[name] = index + 1
        return prefix + (name if index == 0 else f"{name}.call{index}")

    for op in program["ops"]:
        kind = op["op"]
        if kind == "input":
            array, mask = pending_inputs.pop(0)
            results = [(array if op.get("kind") == "tokens" else np.asarray(array, np.float64), mask)]
        elif kind == "embedding":
            ids, _ = values[op["src"]]
            table = np.asarray(objects[op["name"]].embeddings.numpy(), np.float64)
            results = [(table[ids], (ids != 0) if op["mask_zero"] else None)]
        elif kind == "masking":
            x, _ = values[op["src"]]
            mask = np.any(x != op["mask_value"], axis=-1)
            results = [(x * mask[..., None], mask)]
        elif kind == "dense":
            x, mask = values[op["src"]]
            layer = objects[op["name"]]
            y = x @ np.asarray(layer.kernel.numpy(), np.float64) + np.asarray(layer.bias.numpy(), np.float64)
            results = [(reference.get_activation(op["activation"], flavour)(y), mask)]
        elif kind in ("add", "concatenate"):
            parts = [values[i] for i in op["srcs"]]
            if kind == "add":
                y = sum(p[0] for p in parts)
            else:
                y = np.concatenate([p[0] for p in parts], axis=-1)
            masks = [p[1] for p in parts] if parts[0][0].ndim == 3 else [None]
            results = [(y, _merge_mask(kind, masks, flavour))]
        elif kind == "last_step":
            x, _ = values[op["src"]]
            results = [(x[:, -1], None)]
        elif kind in ("recurrent", "bidirectional"):
            results = _interpret_recurrent(op, objects[op["name"]], values, op["src"], op["initial_state"],
                                           flavour, site_of(op["name"]), owners + (op["name"],), sites)
        elif kind == "call":
            target = ops_by_name[op["target"]]
            if target["op"] == "nested":
                results = _interpret_nested(target, objects, values[op["src"]], flavour,
                                            site_of(target["name"]), owners, sites)
            else:
                results = _interpret_recurrent(target, objects[target["name"]], values, op["src"],
                                               op["initial_state"], flavour, site_of(target["name"]),
                                               owners + (target["name"],), sites)
        elif kind == "nested":
            results = _interpret_nested(op, objects, values[op["src"]], flavour, site_of(op["name"]), owners, sites)
        else:
            raise AssertionError(op)
        values.extend(results)
    return [values[i] for i in program["outputs"]]


def _interpret_nested(op, objects, value, flavour, site, owners, sites):
    return _interpret_program(op["program"], objects, [value], flavour, prefix=site + ".",
                              owners=owners + (op["name"],), sites=sites)


def _interpret_recurrent(op, layer, values, src, initial_state, flavour, site, owners, sites):
    kind = RECURRENT_KINDS[op["kind"]]
    config = op["config"]
    x, mask = values[src]
    init = [values[i][0] for i in initial_state] if initial_state else None
    # Keras 3 hands a layer its mask only when the call has a single tensor argument: with an
    # initial state the layer runs unmasked (its output still carries the input's mask).
    run_mask = None if (init is not None and flavour == "keras3") else mask
    out_mask = mask if config["return_sequences"] else None
    states = len(kind.state_names)
    if op["op"] == "recurrent":
        result = kind.reference(layer, x, run_mask, init, flavour, bool(getattr(layer, "zero_output_for_mask", False)))
        sites.append(ExpectedSite(site, owners, kind, result))
        main = result["output"] if config["return_sequences"] else result["last_output"]
        finals = [result[f"last_{s}"] for s in kind.state_names] if config["return_state"] else []
        return [(main, out_mask)] + [(f, None) for f in finals]
    # Bidirectional forces zero_output_for_mask=return_sequences on both directions.
    zero = bool(config["return_sequences"])
    forward = kind.reference(layer.forward_layer, x, run_mask, init[:states] if init else None, flavour, zero)
    backward = kind.reference(layer.backward_layer, x, run_mask, init[states:] if init else None, flavour, zero)
    sites.append(ExpectedSite(site + ".forward", owners, kind, forward))
    # The library aligns the backward direction's sequences with input time, as Bidirectional
    # aligns its backward output.
    flipped = {k: (v[:, ::-1] if np.ndim(v) >= 2 and k not in ("last_output",) and not k.startswith("last_") else v)
               for k, v in backward.items()}
    sites.append(ExpectedSite(site + ".backward", owners, kind, flipped))
    if config["return_sequences"]:
        y, y_rev = forward["output"], backward["output"][:, ::-1]
    else:
        y, y_rev = forward["last_output"], backward["last_output"]
    merge_mode = op["merge_mode"]
    if merge_mode == "concat":
        merged = [np.concatenate([y, y_rev], axis=-1)]
    elif merge_mode == "sum":
        merged = [y + y_rev]
    elif merge_mode == "ave":
        merged = [(y + y_rev) / 2]
    elif merge_mode == "mul":
        merged = [y * y_rev]
    else:
        merged = [y, y_rev]
    finals = []
    if config["return_state"]:
        finals = [forward[f"last_{s}"] for s in kind.state_names] + [backward[f"last_{s}"] for s in kind.state_names]
    return [(m, out_mask) for m in merged] + [(f, None) for f in finals]


# ------------------------------------------------------------------------------------------------
# The properties
# ------------------------------------------------------------------------------------------------

ORACLE_TOLERANCE = dict(atol=1e-4, rtol=1e-3)  # float64 oracle vs float32 Keras, through up to 4 layers
SAME_TOLERANCE = dict(atol=1e-5, rtol=1e-4)  # the library's own verification tolerance


def expected_exposed(spec, sites) -> tuple[dict, dict]:
    """``(states, masks)``: output name -> expected array, for what ``spec["expose"]`` asks."""
    expose = spec["expose"]
    selected = expose["layers"]
    expected = {}
    for site in sites:
        if selected is not None and not set(selected) & set(site.layer_names):
            continue
        for requested in expose["states"]:
            for q in site.kind.gates if requested == "gates" else (requested,):
                if q in site.kind.quantities:
                    expected[f"{site.site}.{q}"] = site.result[q]
    masks = {}
    if expose["expose_masks"]:
        for site in sites:
            if selected is None or set(selected) & set(site.layer_names):
                masks[f"{site.site}.mask"] = site.result["mask"]
    return expected, masks


def check_spec(spec, flavour: str) -> None:
    """Every property a generated model must have, on one flavour.

    1. The NumPy interpreter reproduces the model's outputs (so it can be trusted as the oracle).
    2. The traced model's original outputs equal the model's, with the same names, first.
    3. Every exposed state (and mask) equals the oracle's, under its expected name.
    4. The input model is untouched (weights, layers, graph, outputs).
    5. The traced model saves to .keras and reloads to the same outputs.

    With ``FUZZ_FAILURES=<path>`` in the environment, a failing spec is appended to that file.
    """
    try:
        _check_spec(spec, flavour)
    except Exception as error:
        # Long runs stop at the first failure and print it only at the end: log it at once.
        log = os.environ.get("FUZZ_FAILURES")
        if log:
            with open(log, "a") as handle:
                handle.write(f"{flavour}: {type(error).__name__}: {str(error)[:3000]}\nspec = {spec!r}\n\n")
        raise


def _check_spec(spec, flavour: str) -> None:
    import lstm_rewrite  # noqa: F401  (registers the traced layers)
    from lstm_rewrite import expose_cell_states

    keras = keras_of(flavour)
    model, objects = build(spec, flavour)
    data = make_inputs(spec)
    guard = Untouched(model, data)

    oracle_outputs, sites = interpret(spec, objects, data, flavour)
    assert len(oracle_outputs) == len(guard.outputs)
    for k, (want, got) in enumerate(zip(oracle_outputs, guard.outputs)):
        np.testing.assert_allclose(got, want, **ORACLE_TOLERANCE,
                                   err_msg=f"the oracle disagrees with Keras on output {k} (a fuzzer bug)")

    expose = spec["expose"]
    traced = expose_cell_states(
        model, states=tuple(expose["states"]), layers=expose["layers"], expose_masks=expose["expose_masks"],
        sample_inputs=data if expose["sample_inputs"] else None,
    )
    expected, masks = expected_exposed(spec, sites)
    original_names = list(model.output_names)
    names = list(traced.output_names)
    assert names[:len(original_names)] == original_names
    assert sorted(names[len(original_names):]) == sorted([*expected, *masks]), "exposed outputs differ"
    outputs = run(traced, data)
    named = dict(zip(names, outputs))
    for k, want in enumerate(guard.outputs):
        np.testing.assert_allclose(outputs[k], want, **SAME_TOLERANCE, err_msg=f"original output {names[k]}")
    for name, want in expected.items():
        got = named[name]
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        np.testing.assert_allclose(got, want, **ORACLE_TOLERANCE, err_msg=name)
    for name, want in masks.items():
        np.testing.assert_array_equal(named[name], want, err_msg=name)
    guard.check()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "traced.keras")
        traced.save(path)
        reloaded = keras.models.load_model(path)
        assert list(reloaded.output_names) == names
        for name, want, got in zip(names, outputs, run(reloaded, data)):
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{name} after reloading")
