"""Masked steps: what the traced sequences hold where the input is masked.

A recurrent state holds its carried value on a masked step (the initial state before the first
valid step); every other exposed quantity holds its value of the last valid step, zero before any,
as the loops that repeat their previous output give it. These helpers put those values in when the
loop that ran did not (`TracedRNN`, `ReconstructedLSTM`).
"""

from __future__ import annotations


def first_mask(mask):
    """The mask of a recurrent call's sequence input (tf-keras hands a list of masks when initial
    states are folded into the inputs)."""
    if isinstance(mask, (list, tuple)):
        return mask[0] if mask else None
    return mask


def expand_like(ops, step_mask, tensor):
    """``[batch, time]`` -> ``[batch, time, 1, ...]``, to broadcast over ``tensor``'s trailing axes."""
    expanded = step_mask
    for _ in range(len(tensor.shape) - 2):
        expanded = ops.expand_dims(expanded, -1)
    return expanded


def fill_masked(ops, parts, step_mask):
    """Each masked step of each part takes the value of the last valid step before it (zero before
    the first, which `carry_initial_state` then replaces by the initial state where that is
    carried): what a loop that repeats its previous output gives, from a loop that zeroed masked
    steps."""
    if not isinstance(step_mask.shape[1], int):
        # Only shapes are asked for (a symbolic or shape-polymorphic time axis, where no scan
        # can run), and filling keeps them.
        return parts
    positions = ops.cumsum(ops.ones_like(step_mask, dtype="int32"), axis=1) - 1  # [batch, time]: t
    marked = ops.where(step_mask, positions, -ops.ones_like(positions))
    last_valid = ops.associative_scan(ops.maximum, marked, axis=1)  # [batch, time]
    seen = last_valid >= 0
    index = ops.maximum(last_valid, 0)
    filled = []
    for part in parts:
        # [batch, time, 1, ...]: take_along_axis broadcasts it over the part's trailing axes (JAX
        # and NumPy, the backends that fill), so no index array of the part's size is made.
        repeated = ops.take_along_axis(part, expand_like(ops, index, part), axis=1)
        filled.append(ops.where(expand_like(ops, seen, part), repeated, 0.0))
    return filled


def carry_initial_state(ops, sequence, step_mask, initial_state, index, backwards=False):
    """``sequence`` with the initial state ``initial_state[index]`` (zeros when None) before the
    first valid step: the RNN loop repeats its previous *output* on masked steps, and that output is
    zero there, where the state it carries is the initial state. ``backwards``: ``sequence`` and
    ``step_mask`` are in input time for a layer that ran backwards (its first step is the last)."""
    counted = ops.flip(step_mask, axis=1) if backwards else step_mask
    seen = ops.cumsum(ops.cast(counted, "int32"), axis=1) > 0  # [batch, time], processing order
    if backwards:
        seen = ops.flip(seen, axis=1)
    if initial_state is not None:
        start = ops.expand_dims(ops.cast(initial_state[index], sequence.dtype), 1)
        start = start + ops.zeros_like(sequence)
    else:
        start = ops.zeros_like(sequence)
    return ops.where(expand_like(ops, seen, sequence), sequence, start)
