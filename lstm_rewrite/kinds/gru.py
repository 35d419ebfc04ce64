"""The GRU kind: ``GRU`` and ``RNN(GRUCell)``, either ``reset_after``; state [h], gates z, r, n."""

from .registry import RecurrentKind, register


def step(ops, cell, inputs, states, recurrent_input, edit) -> dict:
    """One Keras GRU step, either ``reset_after`` (see `RecurrentKind.step`); reads h_{t-1} =
    ``states[0]`` (the new h mixes it in without recurrent dropout, as Keras's does)."""
    h_tm1 = states[0]
    units = cell.units
    input_bias = recurrent_bias = None
    if cell.use_bias:
        if cell.reset_after:
            # Bias [2, 3 * units]: the input part, then the recurrent part.
            input_bias, recurrent_bias = ops.unstack(ops.convert_to_tensor(cell.bias), axis=0)
        else:
            input_bias = cell.bias
    x = ops.matmul(inputs, cell.kernel)
    if input_bias is not None:
        x = x + input_bias
    x_z, x_r, x_n = ops.split(x, 3, axis=-1)  # [batch, units] each
    if cell.reset_after:
        inner = ops.matmul(recurrent_input, cell.recurrent_kernel)
        if recurrent_bias is not None:
            inner = inner + recurrent_bias
        h_z, h_r, h_n = ops.split(inner, 3, axis=-1)
        z = edit("z", cell.recurrent_activation(x_z + h_z))
        r = edit("r", cell.recurrent_activation(x_r + h_r))
        n = edit("n", cell.activation(x_n + r * h_n))
    else:
        h_z, h_r = ops.split(ops.matmul(recurrent_input, cell.recurrent_kernel[:, : 2 * units]), 2, axis=-1)
        z = edit("z", cell.recurrent_activation(x_z + h_z))
        r = edit("r", cell.recurrent_activation(x_r + h_r))
        n = edit("n", cell.activation(x_n + ops.matmul(r * recurrent_input, cell.recurrent_kernel[:, 2 * units:])))
    h = edit("h", z * h_tm1 + (1 - z) * n)
    return {"h": h, "z": z, "r": r, "n": n}


GRU = register(RecurrentKind(
    name="gru", label="GRU",
    quantities=("h", "z", "r", "n"),
    state_index={"h": 0},
    recurrent=("h",),
    layer="GRU", cell="GRUCell", traced_cell="TracedGRUCell",
    step=step,
    dropout_draws=3,
))
