"""Weights: copy a recurrent layer's weights into its built traced replacement, by role, shapes checked.

Each cell's weights are paired by the roles its kind names (`RecurrentKind.weight_roles`: kernel,
recurrent kernel, bias), so a traced cell whose variables were created in another order still gets
each weight where it belongs; a custom cell's, whose roles nobody knows, are paired in order with
those of the copy its traced cell runs. Stateful layers' states travel too.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedLayerError


def copy_weights(backend, planned, traced) -> None:
    """Copy the weights (and stateful states) of ``planned.layer`` into ``traced``, built.

    Args:
        backend: the backend of the layer's flavour.
        planned: the `lstm_rewrite.rewrite.plan.PlannedLayer` of one recurrent layer (not a
            Bidirectional: each direction is copied on its own).
        traced: its built traced replacement (a TracedRNN or a ReconstructedLSTM).

    Raises:
        UnsupportedLayerError: a weight whose shape differs from its traced counterpart's.

    Example:
        >>> copy_weights(backend, planned, traced)   # traced now computes what planned.layer does
    """
    source = planned.layer
    traced_cells = list(traced.rnn.cell.cells) if planned.kind.stacks else [traced.rnn.cell]
    pairs = []
    for exposed, traced_cell in zip(planned.cells, traced_cells):
        pairs += _cell_pairs(planned, exposed, traced_cell)
    # Stateful states: a ConvLSTM's travel flat in the traced RNN, hence the reshape.
    states = list(zip(backend.stateful_variables(source), backend.stateful_variables(traced.rnn)))
    for source_weight, target, flat_ok in [(s, t, False) for s, t in pairs] + [(s, t, True) for s, t in states]:
        value = np.asarray(backend.to_numpy(source_weight))
        shape = tuple(target.shape)
        if tuple(value.shape) != shape:
            if not (flat_ok and value.size == math.prod(shape)):
                raise UnsupportedLayerError(
                    f"Layer {source.name!r} ({planned.layer_class}): weight {source_weight.name!r} "
                    f"has shape {value.shape}, but the traced copy expects {shape}. This is a bug in "
                    f"lstm_rewrite; please report it."
                )
            value = value.reshape(shape)
        target.assign(value)


def _cell_pairs(planned, exposed, traced_cell) -> list:
    """(source weight, traced weight) pairs of one cell, by its kind's roles or else in order."""
    source_cell, kind = exposed.cell, exposed.kind
    roles = kind.weight_roles
    if not roles:
        runs = traced_cell.cell if kind.copies_cell else traced_cell
        source_weights, traced_weights = list(source_cell.weights), list(runs.weights)
        if len(source_weights) != len(traced_weights):
            raise UnsupportedLayerError(
                f"Layer {planned.layer.name!r} ({planned.layer_class}): the copy of its cell "
                f"{source_cell.name!r} made from get_config() has {len(traced_weights)} weights, the cell "
                f"{len(source_weights)}. Give the cell a get_config() that rebuilds it exactly, or exclude "
                f"the layer with layers=[...]. Received: {[w.name for w in source_weights]}"
            )
        return list(zip(source_weights, traced_weights))
    if roles[-1] == "bias" and not source_cell.use_bias:
        roles = roles[:-1]
    return [(getattr(source_cell, role), getattr(traced_cell, role)) for role in roles]
