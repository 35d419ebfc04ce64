"""The LSTM kind: ``LSTM`` and ``RNN(LSTMCell)``; states [h, c], gates i, f, g, o."""

from .registry import RecurrentKind, register


def step(ops, cell, inputs, states, recurrent_input, edit) -> dict:
    """One Keras LSTM step (see `RecurrentKind.step`); reads c_{t-1} = ``states[1]``.

    Keras's gate order in the kernels is i, f, g (the candidate, ``c`` in Keras), o.
    """
    z = ops.matmul(inputs, cell.kernel) + ops.matmul(recurrent_input, cell.recurrent_kernel)
    if cell.use_bias:
        z = z + cell.bias
    return lstm_update(cell, ops.split(z, 4, axis=-1), states[1], edit)  # [batch, units] each


def lstm_update(cell, pre_activations, c_prev, edit) -> dict:
    """The LSTM equations from the gates' pre-activations ``(z_i, z_f, z_g, z_o)`` and c_{t-1},
    with the cell's activations; shared by every LSTM kind (ConvLSTM's come from convolutions).

    Each edit applies where its quantity enters the step: gates before they make c, c before h.
    """
    z_i, z_f, z_g, z_o = pre_activations
    i = edit("i", cell.recurrent_activation(z_i))
    f = edit("f", cell.recurrent_activation(z_f))
    g = edit("g", cell.activation(z_g))
    o = edit("o", cell.recurrent_activation(z_o))
    c = edit("c", f * c_prev + i * g)
    h = edit("h", o * cell.activation(c))
    return {"c": c, "h": h, "i": i, "f": f, "g": g, "o": o}


LSTM = register(RecurrentKind(
    name="lstm", label="LSTM",
    quantities=("c", "h", "i", "f", "g", "o"),
    state_index={"h": 0, "c": 1},
    recurrent=("c",),
    layer="LSTM", cell="LSTMCell", traced_cell="TracedLSTMCell",
    step=step,
    dropout_draws=4,
    fast_path="reconstruct",
    # Unrolled, the RNN stacks the steps' outputs itself, which needs one tensor per step.
    split_outputs=True,
))
