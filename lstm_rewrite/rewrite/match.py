"""Matching: which recurrent kind one layer call is, asked of the registry, and what is refused.

The registry (`lstm_rewrite.kinds`) names each kind's Keras classes by backend attribute
(``kind.layer == "LSTM"`` is ``backend.LSTM``); `matchers` resolves them once per backend. A layer
is matched by its class when it is one of the Keras layers that build their own cell, otherwise
(an ``RNN``) by its cell. Everything the rewrite cannot reproduce exactly is refused here, with
the layer's name, before anything is built.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .. import kinds
from ..layers.subclass import wrapping_call
from ..errors import UnsupportedLayerError
from ..kinds import RecurrentKind


@dataclasses.dataclass(frozen=True)
class Matchers:
    """The registry resolved against one backend: the classes each kind matches."""

    layers: tuple  # ((Keras layer class, kind), ...): the layers that build their own cell
    cells: tuple  # ((Keras cell class, kind), ...): the cells an RNN may run, stacks excepted
    stacks: tuple  # ((Keras cell class, kind), ...): the cells that hold other cells
    custom: RecurrentKind  # the kind of a custom cell (one the rewrite runs a copy of)


@functools.lru_cache(maxsize=None)
def matchers(backend) -> Matchers:
    """The registry's kinds resolved to ``backend``'s classes (computed once per backend).

    Example:
        >>> [kind.name for _, kind in matchers(backend).layers]
        ['lstm', 'gru', 'simple_rnn', 'conv_lstm']
    """
    registered = kinds.all_kinds()
    return Matchers(
        layers=tuple((getattr(backend, k.layer), k) for k in registered if k.layer),
        cells=tuple((getattr(backend, k.cell), k) for k in registered if k.cell and not k.stacks),
        stacks=tuple((getattr(backend, k.cell), k) for k in registered if k.cell and k.stacks),
        custom=next(k for k in registered if k.copies_cell),
    )


def layer_class_kind(layer, backend):
    """``(Keras base class, kind)`` of a recurrent layer that builds its own cell (an ``LSTM``),
    or ``(backend.RNN, None)`` for an ``RNN`` classified by its cell."""
    return next(((base, kind) for base, kind in matchers(backend).layers if isinstance(layer, base)),
                (backend.RNN, None))


def cell_kind(cell, backend) -> RecurrentKind | None:
    """The kind of a Keras cell that runs Keras's own step; None for a custom cell (or one whose
    step is overridden), which the rewrite runs a copy of."""
    for base, kind in matchers(backend).cells:
        if isinstance(cell, base) and type(cell).call is base.call:
            return kind
    return None


def is_bidirectional(layer, backend) -> bool:
    """Whether ``layer`` is a ``Bidirectional`` over recurrent layers (the rewrite traces each direction)."""
    return isinstance(layer, backend.Bidirectional) and isinstance(layer.forward_layer, backend.RNN)


def wrapped_recurrent(layer, backend):
    """The recurrent layer inside a wrapper other than Bidirectional (refused), or None."""
    if not isinstance(layer, backend.Wrapper):
        return None
    inner = getattr(layer, "layer", None)
    while inner is not None and not isinstance(inner, backend.RNN):
        inner = getattr(inner, "layer", None) if isinstance(inner, backend.Wrapper) else None
    return inner


def refuse_wrapped(layer, inner) -> None:
    """Refuse a recurrent layer inside a wrapper other than Bidirectional."""
    kind = type(inner).__name__
    raise UnsupportedLayerError(
        f"Layer {layer.name!r} ({type(layer).__name__}) wraps {_article(kind)} {kind} ({inner.name!r}), and "
        f"the rewrite handles recurrent layers directly in the model or inside Bidirectional only. Rebuild "
        f"the model with the {kind} outside the wrapper, or leave it out with layers=[...] naming the other "
        f"recurrent layers. Received: {type(layer).__name__}({kind})"
    )


def _article(word: str) -> str:
    # "an LSTM", "an RNN", "a GRU", "a SimpleRNN": acronyms read letter by letter.
    spelled = len(word) > 1 and word[1].isupper()
    return "an" if word[0] in "AEIOU" or (spelled and word[0] in "FHLMNRSX") else "a"


def recurrent_kind(layer, backend, owner=None) -> RecurrentKind:
    """The kind of one recurrent layer (not Bidirectional).

    Args:
        layer: a Keras ``RNN`` (an ``LSTM``, ``GRU``, ..., or an ``RNN`` over any cell).
        backend: the backend module of the layer's flavour.
        owner: the ``Bidirectional`` holding ``layer``, if any (messages name it).

    Returns:
        The registered kind; a custom cell's is the generic kind, not yet specialised to its states.

    Raises:
        UnsupportedLayerError: naming the layer, when the rewrite cannot reproduce it exactly (an
            overridden ``call`` or cell step, time-major input, a custom cell it cannot trace).

    Example:
        >>> recurrent_kind(model.get_layer("encoder"), backend).name
        'lstm'
    """
    where = f" (inside {owner.name!r})" if owner is not None else ""
    base, kind = layer_class_kind(layer, backend)
    cell = layer.cell
    cell_kept = kind is None or cell_kind(cell, backend) is kind
    why = None if cell_kept else f"its cell ({type(cell).__name__}) is not the Keras one"
    if cell_kept and type(layer).call is not base.call:
        # A subclass whose call only wraps super().call runs its own call over the traced layer
        # (TracedSubclassRNN), and verification decides; anything else is refused here.
        try:
            wrapping_call(type(layer), base)
            why = "it is inside a wrapper" if owner is not None else None
        except ValueError as error:
            why = str(error)
    if why is not None:
        name = base.__name__
        raise UnsupportedLayerError(
            f"Layer {layer.name!r}{where} ({type(layer).__name__}) is {_article(name)} {name} whose call or cell is "
            f"overridden, and {why}. The traced cell reproduces only the Keras {name} step, and runs a subclass's "
            f"own call only where that call wraps super().call(...) and the layer is not inside a wrapper; "
            f"otherwise the states would not be the layer's. Exclude it with layers=[...]. "
            f"Received: {type(layer).__module__}.{type(layer).__name__}"
        )
    if getattr(layer, "time_major", False):
        raise UnsupportedLayerError(
            f"Layer {layer.name!r}{where} ({type(layer).__name__}) is time-major; the rewrite supports batch-major "
            f"recurrent layers only. Rebuild it with time_major=False. Received: time_major=True"
        )
    if kind is not None:
        return kind
    for stack_class, stack_kind in matchers(backend).stacks:
        if isinstance(cell, stack_class):
            if type(cell).call is not stack_class.call or getattr(cell, "reverse_state_order", False):
                raise UnsupportedLayerError(
                    f"Layer {layer.name!r}{where} ({describe_layer(layer, backend)}) stacks its cells in a way the "
                    f"rewrite does not reproduce (an overridden {stack_class.__name__}.call, or "
                    f"reverse_state_order=True). Exclude it with layers=[...]. "
                    f"Received: {type(cell).__module__}.{type(cell).__name__}"
                )
            for inner in cell.cells:
                _check_cell(layer, inner, backend, where)
            return stack_kind
    return _check_cell(layer, cell, backend, where)


def _check_cell(layer, cell, backend, where) -> RecurrentKind:
    """The kind of the cell an ``RNN`` runs: a Keras cell's, or the custom kind for a cell it can trace."""
    kind = cell_kind(cell, backend)
    label = (f"Layer {layer.name!r}{where} ({describe_layer(layer, backend)}) runs the cell {cell.name!r} "
             f"({type(cell).__name__})")
    if kind is not None and not kind.standalone_cell:
        raise UnsupportedLayerError(
            f"{label}, which Keras runs only inside its {kind.label}1D/2D/3D layers. Use those layers, or exclude "
            f"it with layers=[...]. Received: {type(cell).__name__}"
        )
    if kind is not None:
        return kind
    sizes = getattr(cell, "state_size", None)
    if flat_state_sizes(sizes) is None or not _is_width(getattr(cell, "output_size", None), allow_none=True):
        raise UnsupportedLayerError(
            f"{label}, a custom cell whose states or output are not flat vectors (state_size={sizes!r}, "
            f"output_size={getattr(cell, 'output_size', None)!r}): the traced cell emits each state at every "
            f"step as a [batch, n] slice, so it cannot trace this cell. Give the cell an int or a list of ints "
            f"as state_size, or exclude the layer with layers=[...]. Received: state_size={sizes!r}"
        )
    try:
        copy_cell(cell)
    except Exception as error:  # noqa: BLE001 - any failure to rebuild the cell from its config
        raise UnsupportedLayerError(
            f"{label}, a custom cell that cannot be rebuilt from its config ({type(error).__name__}: "
            f"{' '.join(str(error).split())}). "
            f"The rewrite traces a copy of the cell so that your model stays untouched: give the cell a "
            f"get_config() that returns its constructor arguments, or exclude the layer with layers=[...]. "
            f"Received: {type(cell).__module__}.{type(cell).__name__}"
        ) from error
    return matchers(backend).custom


def _is_width(value, allow_none=False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def flat_state_sizes(sizes):
    """A cell's ``state_size`` as a list of ints, or None when it is nested or holds shapes."""
    if _is_width(sizes):
        return [int(sizes)]
    if sizes is None or isinstance(sizes, str) or hasattr(sizes, "as_list"):
        return None
    try:
        flat = list(sizes)
    except TypeError:
        return None
    return [int(s) for s in flat] if flat and all(_is_width(s) for s in flat) else None


def copy_cell(cell):
    """An unbuilt copy of a custom cell from its config (the traced cell runs the copy)."""
    return type(cell).from_config(cell.get_config())


def wrapping_subclass(layer, backend):
    """The class of a recurrent layer whose own ``call`` wraps its Keras parent's, or None.

    Such a layer is traced as a `TracedSubclassRNN`, which runs the subclass's call over the
    traced layer.

    Example:
        >>> wrapping_subclass(model.get_layer("encoder"), backend) is None
        True
    """
    base, _ = layer_class_kind(layer, backend)
    return type(layer) if type(layer).call is not base.call else None


def describe_layer(layer, backend) -> str:
    """The class of a recurrent layer as reports show it: ``GRU``, ``RNN(LSTMCell)``, ``Bidirectional(GRU)``.

    Example:
        >>> describe_layer(model.get_layer("bi"), backend)
        'Bidirectional(LSTM)'
    """
    if isinstance(layer, backend.Bidirectional):
        return f"{type(layer).__name__}({describe_layer(layer.forward_layer, backend)})"
    if layer_class_kind(layer, backend)[1] is not None:
        return type(layer).__name__
    return f"{type(layer).__name__}({type(layer.cell).__name__})"
