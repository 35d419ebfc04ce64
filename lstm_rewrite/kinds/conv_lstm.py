"""The ConvLSTM kind: ``ConvLSTM1D/2D/3D``; an LSTM whose states are feature maps."""

from .lstm import lstm_update
from .registry import RecurrentKind, register


def step(ops, cell, inputs, states, recurrent_input, edit) -> dict:
    """One Keras ConvLSTM step (see `RecurrentKind.step`): the LSTM's, with the kernels' matmuls
    as the cell's own convolutions; reads c_{t-1} = ``states[1]``, ``[batch, *state_shape]``."""
    kernels = ops.split(cell.kernel, 4, axis=cell.rank + 1)
    recurrent_kernels = ops.split(cell.recurrent_kernel, 4, axis=cell.rank + 1)
    biases = ops.split(cell.bias, 4) if cell.use_bias else [None] * 4
    pre_activations = [
        cell.input_conv(inputs, k, b, padding=cell.padding) + cell.recurrent_conv(recurrent_input, rk)
        for k, rk, b in zip(kernels, recurrent_kernels, biases)
    ]  # [batch, *state_shape] each
    return lstm_update(cell, pre_activations, states[1], edit)


CONV_LSTM = register(RecurrentKind(
    name="conv_lstm", label="ConvLSTM",
    quantities=("c", "h", "i", "f", "g", "o"),
    state_index={"h": 0, "c": 1},
    recurrent=("c",),
    layer="ConvLSTM", cell="ConvLSTMCell", traced_cell="TracedConvLSTMCell",
    # Keras runs a ConvLSTMCell only inside its ConvLSTM layers, never in a plain RNN.
    standalone_cell=False,
    spatial=True,
    step=step,
))
