"""Interventions inside the step: the edits a traced cell applies where each quantity is computed.

An edited cell (one with ``edits``, set by `lstm_rewrite.interventions`) receives
``concat([x, t, *channels])`` at each step: ``t`` is the step's input-time index (the same for
go_backwards and a Bidirectional's backward half, which run over reversed inputs), ``channels``
the call-time data (per-sample step masks, unit masks, patch values) whose offsets the edits name.
`TracedRNN` builds that input (`with_edit_channels`); the cell splits it (`split_edit_inputs`) and
hands the kind's step an ``edit(quantity, value)`` (`step_editor`).
"""

from __future__ import annotations


def unedited(quantity, value):
    """The editor of a cell without edits: every value as computed (no op)."""
    return value


def edited_input_shape(cell, input_shape) -> tuple:
    """The shape a cell builds its kernel for: the step input without the edit channels."""
    if not cell.edits:
        return input_shape
    return tuple(input_shape)[:-1] + (int(cell.input_width),)


def split_edit_inputs(cell, inputs):
    """``(x, t, channels)`` of an edited cell's step input; ``(inputs, None, None)`` without edits."""
    if not cell.edits:
        return inputs, None, None
    width = int(cell.input_width)
    return inputs[:, :width], inputs[:, width], inputs[:, width + 1:]  # [batch, F], [batch], [batch, C]


def step_editor(ops, cell, t, channels):
    """``edit(quantity, value)`` applying ``cell.edits`` of that quantity at step ``t``."""
    if not cell.edits:
        return unedited

    def edit(quantity, value):
        for spec in cell.edits:
            if spec["quantity"] == quantity:
                value = _apply_edit(ops, spec, value, t, channels, int(cell.units))
        return value

    return edit


def edit_config(cell) -> dict:
    """The config entries of a cell's edits (none without)."""
    if not cell.edits:
        return {}
    return {"edits": [dict(e) for e in cell.edits], "input_width": cell.input_width}


def widened_input_shape(input_shape, edit_channels) -> tuple:
    """The inner RNN's input shape once ``t`` and the edit channels are appended."""
    return tuple(input_shape)[:-1] + (int(tuple(input_shape)[-1]) + 1 + sum(edit_channels),)


def with_edit_channels(ops, layer, inputs, edit_inputs):
    """``concat([x, t, *edit_inputs])``: t is the input-time index of each step (so go_backwards
    sees it reversed with x), each call-time tensor ``[batch, time]`` or ``[batch, time, n]``.

    Raises:
        ValueError: when ``edit_inputs`` are not one per channel of ``layer.edit_channels``.
    """
    edit_inputs = list(edit_inputs or [])
    if len(edit_inputs) != len(layer.edit_channels):
        raise ValueError(
            f"Layer {layer.name!r} (TracedRNN) runs edits that read {len(layer.edit_channels)} call-time "
            f"input(s); pass them as edit_inputs=[...]. Received: {len(edit_inputs)}")
    ones = ops.ones_like(inputs[..., :1])  # [batch, time, 1]
    steps = ops.cumsum(ones, axis=1) - ones  # 0, 1, 2, ... in input time
    parts = [inputs, steps]
    for tensor, width in zip(edit_inputs, layer.edit_channels):
        tensor = ops.cast(tensor, inputs.dtype)
        if len(tensor.shape) == 2:
            tensor = ops.expand_dims(tensor, -1)  # [batch, time, 1]
        parts.append(tensor)
    return ops.concatenate(parts, axis=-1)


def _active_steps(ops, steps, t, channels, dtype):
    """[batch] float: 1.0 where the edit applies at this step."""
    if "channel" in steps:
        return ops.cast(ops.greater(channels[:, int(steps["channel"])], 0.5), dtype)
    if "at" in steps:
        on = ops.zeros_like(t)
        for step in steps["at"]:
            on = on + ops.cast(ops.equal(t, float(step)), dtype)
        return ops.cast(ops.greater(on, 0.5), dtype)
    start, stop, every = int(steps.get("start", 0)), steps.get("stop"), int(steps.get("every", 1))
    on = ops.cast(ops.greater_equal(t, float(start)), dtype)
    if stop is not None:
        on = on * ops.cast(ops.less(t, float(stop)), dtype)
    if every != 1:
        on = on * ops.cast(ops.equal(ops.mod(t - float(start), float(every)), 0.0), dtype)
    return on


def _apply_edit(ops, spec, value, t, channels, units):
    dtype = value.dtype
    on = ops.expand_dims(_active_steps(ops, spec["steps"], ops.cast(t, dtype), channels, dtype), -1)  # [batch, 1]
    if spec.get("units_channel") is not None:
        offset = int(spec["units_channel"])
        chosen = ops.cast(channels[:, offset:offset + units], dtype)  # [batch, units], per sample
    else:
        chosen = ops.convert_to_tensor([1.0 if k in set(spec["units"]) else 0.0 for k in range(units)],
                                       dtype=dtype)  # [units]
    kind = spec["kind"]
    if kind == "ablate":
        new = ops.convert_to_tensor([float(v) for v in spec["value"]], dtype=dtype)  # [units]
    elif kind == "clamp":
        low = -3.0e38 if spec.get("low") is None else float(spec["low"])
        high = 3.0e38 if spec.get("high") is None else float(spec["high"])
        new = ops.clip(value, low, high)
    elif kind == "scale":
        new = value * float(spec["factor"])
    elif kind == "add":
        new = value + float(spec["alpha"]) * ops.convert_to_tensor(
            [float(v) for v in spec["direction"]], dtype=dtype)
    elif kind == "patch":
        offset = int(spec["source_channel"])
        new = ops.cast(channels[:, offset:offset + units], dtype)
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return ops.where(ops.greater(on * chosen, 0.5), new, value)
