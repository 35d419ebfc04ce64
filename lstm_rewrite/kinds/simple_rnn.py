"""The SimpleRNN kind: ``SimpleRNN`` and ``RNN(SimpleRNNCell)``; its only quantity is its state h."""

from .registry import RecurrentKind, register


def step(ops, cell, inputs, states, recurrent_input, edit) -> dict:
    """One Keras SimpleRNN step (see `RecurrentKind.step`): ``h = activation(x W + b + h_{t-1} U)``,
    the same ops in the same order as Keras's cell; its recurrence reads only ``recurrent_input``."""
    h = ops.matmul(inputs, cell.kernel)
    if cell.bias is not None:
        h = h + cell.bias
    h = h + ops.matmul(recurrent_input, cell.recurrent_kernel)
    if cell.activation is not None:
        h = cell.activation(h)
    return {"h": edit("h", h)}


SIMPLE_RNN = register(RecurrentKind(
    name="simple_rnn", label="SimpleRNN",
    quantities=("h",),
    state_index={"h": 0},
    recurrent=("h",),
    layer="SimpleRNN", cell="SimpleRNNCell", traced_cell="TracedSimpleRNNCell",
    step=step,
))
