"""The public entry point: rewrite, then prove the original outputs did not change."""

from __future__ import annotations

import os
from collections.abc import Iterable

from . import backends
from .errors import InvalidArgumentError
from .layers.reconstructed import resolve_method
from .rewrite import LayerSelector, record_of, rewrite_model
from .verify import check


def expose_cell_states(
    model,
    states=("c",),
    layers: LayerSelector = None,
    *,
    verify: bool = True,
    sample_inputs=None,
    expose_masks: bool = False,
    method: str = "auto",
):
    """Return a copy of ``model`` that also outputs every recurrent layer's states at every time step.

    The traced model's outputs are the original outputs (same order, names and values), then one
    output per exposed quantity, shape ``[batch, time, units]`` (``[batch, time, *spatial,
    filters]`` for ConvLSTM), named ``<layer>.<quantity>``: ``encoder.c``, ``bi.forward.c`` /
    ``bi.backward.c``, ``shared.call1.c``, ``body.inner.c``, ``gru.h``, ``stack.cell1.c``.
    The input model is never changed.

    Recurrent layers: LSTM, GRU (either ``reset_after``), SimpleRNN, ConvLSTM1D/2D/3D, ``RNN``
    over an LSTMCell, GRUCell or SimpleRNNCell (named like the matching layer), ``RNN`` over
    ``StackedRNNCells`` (``<layer>.cell0.<q>``, ``<layer>.cell1.<q>``, ...), and ``RNN`` over a
    custom cell whose states are flat vectors (``<layer>.state0``, ``<layer>.state1``, ...: its
    flattened state list); each of them inside ``Bidirectional`` and nested models too.

    What ``states`` means for each layer:

    - ``"c"`` (the default) is each layer's recurrent state: c for LSTM and ConvLSTM, h for GRU
      and SimpleRNN (they have no c), every state of a custom cell. ``"h"`` is the hidden state
      (every state of a custom cell), so ``("c", "h")`` gives a GRU's h once.
    - ``"gates"`` is each layer's own gates: i, f, g, o for LSTM and ConvLSTM; z (update),
      r (reset), n (candidate) for GRU; none for SimpleRNN or a custom cell.
    - Other names a layer lacks are skipped for that layer (``("c", "z")`` gives an LSTM's c and a
      GRU's h and z). A request that names nothing a selected layer has (``"gates"`` for a
      SimpleRNN) raises InvalidArgumentError naming that layer; exclude it with ``layers=``. In
      ``StackedRNNCells`` a cell may expose nothing as long as one cell of the stack does.

    On masked steps the states carry over (the initial state before the first valid step) and
    the gates keep their last valid value (zero before the first valid step).

    Args:
        model: a functional or Sequential model, Keras 3 or tf-keras, with at least one recurrent
            layer.
        states: which quantities to expose: any of ``"c"``, ``"h"``, ``"i"``, ``"f"``, ``"g"``,
            ``"o"``, ``"z"``, ``"r"``, ``"n"``, ``"state0"``, ``"state1"``, ..., and ``"gates"``
            (see above).
        layers: which recurrent layers: a name, a list of names (layer names or dotted sites) or
            a predicate on the layer; None for all.
        verify: run both models on ``sample_inputs`` and raise if an original output differs.
        sample_inputs: inputs for the verification; synthesized from the input specs when None.
        expose_masks: also add, per exposed call (per direction of a Bidirectional, per cell of a
            stack), ``<site>.mask`` of shape ``[batch, time]`` (1.0 on valid steps), in the same
            time order as that call's states.
        method: how LSTMs are rewritten. ``"trace"`` runs the LSTM step as a traced cell in a
            generic RNN loop (exact on any device; on a GPU it gives up cuDNN). ``"reconstruct"``
            keeps Keras's own LSTM (cuDNN on a GPU) for h and rebuilds c and the gates from it
            outside the recurrence (`lstm_rewrite.layers.reconstructed`); stateful LSTMs and LSTMs with
            recurrent dropout are traced anyway. ``"auto"`` (the default) reconstructs when
            the Keras backend in use sees a GPU and traces otherwise. Other recurrent layers are always traced.

    Returns:
        A Keras model of the same flavour as ``model``; ``traced.rewrite_record`` describes what
        was added (see `lstm_rewrite.rewrite.record.RewriteRecord`). The record is saved with the model,
        so the traced model loaded back from a file is still recognised as traced.

    Raises:
        UnsupportedModelError, UnsupportedLayerError: what the rewrite cannot handle, by name (e.g.
            a custom cell with nested or non-vector states, or one that cannot be rebuilt from
            its config).
        InvalidArgumentError: an unknown state or layer name, or a file name instead of a model.
        DataError: ``sample_inputs`` that do not fit the model (count, shape, dtype, empty, NaN/Inf).
        VerificationError: the traced model's original outputs differ.

    Example:
        >>> traced = expose_cell_states(model, states=("c", "h", "gates"), layers=["encoder"])
        >>> outputs = traced.predict(x)   # original outputs first, then the state sequences
    """
    if isinstance(model, (str, bytes, os.PathLike)):
        # A common slip: the model's file instead of the model. Say how to load it.
        raise InvalidArgumentError(
            f"expose_cell_states takes a Keras model, not a file name. Load the file first: "
            f"model = lstm_rewrite.loading.load_model({os.fsdecode(model)!r}). Received: {model!r}"
        )
    if not (layers is None or isinstance(layers, str) or callable(layers) or isinstance(layers, Iterable)):
        raise InvalidArgumentError(
            f"layers= takes a layer name, a list of names or a predicate (a function of the layer). "
            f"Received: layers={layers!r} of type {type(layers).__name__}"
        )
    record = record_of(model)
    if record is not None:
        # Tracing a traced model would find only traced layers; its states are already outputs.
        raise InvalidArgumentError(
            f"Model {model.name!r} is already traced: it exposes {record.output_names}. cell_states, audit, "
            f"export_lstmvis and the command line take it as it is; to expose other states or layers, "
            f"trace the original model. Received: a traced model ({type(model).__name__})"
        )
    method = resolve_method(method, backends.for_model(model))
    traced, record = rewrite_model(model, states=states, layers=layers, expose_masks=expose_masks, method=method)
    record.method = method
    if verify:
        record.verification = check(model, traced, sample_inputs)
    return traced


__all__ = ["expose_cell_states", "backends"]
