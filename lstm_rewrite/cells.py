"""Cells and traced layers: the LSTM step that also emits c (h, gates), and the layers that run it.

The classes are written once and defined per Keras flavour by `define_traced_layers`, which each
backend calls with its own ``keras`` module and op set. The backends register them as
serializable, so a traced model saves and loads like any other.

Layout of a traced step: Keras 3's ``RNN`` needs an integer ``cell.output_size``, so the cell
returns one tensor, ``concat([h, *extras])`` along the last axis, that the traced layer splits.
"""

from __future__ import annotations

# Per-step quantities an LSTM can expose, in output order (c first: it is why the library exists).
LSTM_QUANTITIES = ("c", "h", "i", "f", "g", "o")
GATES = ("i", "f", "g", "o")
# The quantities that are recurrent states, with their index in the cell's state list. On masked
# steps they hold the carried state, which before the first valid step is the initial state.
LSTM_STATE_INDEX = {"h": 0, "c": 1}

MERGE_MODES = ("concat", "sum", "ave", "mul", None)


def define_traced_layers(keras, ops, dropout_masks, name_scope):
    """Define TracedLSTMCell, TracedRNN and TracedBidirectional for one Keras flavour.

    Args:
        keras: the ``keras`` (Keras 3) or ``tf_keras`` module.
        ops: an op namespace with the names of ``keras.ops`` used below (the tf-keras backend
            passes a thin shim over TensorFlow).
        dropout_masks: ``f(cell, inputs, h_tm1, training) -> (inputs, h_tm1)`` applying the
            cell's (recurrent) dropout the way that flavour's LSTMCell does during training.
        name_scope: that flavour's name-scope context manager (tf-keras names weights by scope,
            and ``.h5`` files need the forward and backward weights apart).

    Returns:
        A dict of the three classes, keyed by class name.
    """
    layers = keras.layers

    class TracedLSTMCell(layers.LSTMCell):
        """The Keras LSTM step, emitting ``concat([h, *extras])`` as its output.

        ``extras`` names, in order, the quantities appended after h: any of c, i, f, g, o.
        The state list is the LSTM's own ``[h, c]``, so the recurrence is unchanged.
        """

        def __init__(self, units, extras=(), **kwargs):
            super().__init__(units, **kwargs)
            self.extras = tuple(extras)
            # LSTMCell assigns output_size in __init__; widen it to hold h and every extra.
            self.output_size = self.units * (1 + len(self.extras))

        def call(self, inputs, states, training=False):
            h_tm1, c_tm1 = states[0], states[1]
            inputs, h_in = dropout_masks(self, inputs, h_tm1, training)
            z = ops.matmul(inputs, self.kernel) + ops.matmul(h_in, self.recurrent_kernel)
            if self.use_bias:
                z = z + self.bias
            z_i, z_f, z_g, z_o = ops.split(z, 4, axis=-1)  # [batch, units] each
            i = self.recurrent_activation(z_i)
            f = self.recurrent_activation(z_f)
            g = self.activation(z_g)
            o = self.recurrent_activation(z_o)
            c = f * c_tm1 + i * g
            h = o * self.activation(c)
            emitted = {"c": c, "i": i, "f": f, "g": g, "o": o}
            output = ops.concatenate([h] + [emitted[q] for q in self.extras], axis=-1)
            return output, [h, c]

        def get_config(self):
            return {**super().get_config(), "extras": list(self.extras)}

    class TracedRNN(layers.Layer):
        """A recurrent layer call rewritten to also return its per-step states.

        Wraps ``rnn``, an ``RNN`` over a traced cell configured with ``return_sequences=True``,
        ``return_state=True`` and ``zero_output_for_mask=False``, so that every step's
        ``concat([output, *extras])`` survives. ``call`` rebuilds what the original layer
        returned (honouring its own ``return_sequences``, ``return_state`` and
        ``zero_output_for_mask``) and appends the exposed sequences:

            [output, *final_states (if return_state), *exposed, mask (if expose_mask)]

        Exposed sequences are ``[batch, time, ...]`` in the layer's processing order (the order of
        its own ``return_sequences`` output, so reversed input time for ``go_backwards``).
        """

        def __init__(
            self,
            rnn,
            extras=(),
            exposed=(),
            state_index=None,
            return_sequences=False,
            return_state=False,
            zero_output_for_mask=False,
            expose_mask=False,
            **kwargs,
        ):
            super().__init__(**kwargs)
            self.rnn = rnn
            self.extras = tuple(extras)
            self.exposed = tuple(exposed)
            self.state_index = dict(state_index or {})
            self.return_sequences = return_sequences
            self.return_state = return_state
            self.zero_output_for_mask = zero_output_for_mask
            self.expose_mask = expose_mask
            self.supports_masking = True

        def build(self, input_shape):
            # Build the inner RNN here, not lazily in call: Keras 3 traces call in a stateless scope
            # where a stateful RNN could not create its state variables.
            if not self.rnn.built:
                self.rnn.build(input_shape)
            self.built = True

        @property
        def go_backwards(self):
            return self.rnn.go_backwards

        @property
        def num_states(self):
            return len(self.state_index) if self.state_index else 2

        def call(self, inputs, initial_state=None, mask=None, training=None):
            mask = _first_mask(mask)
            results = self.rnn(inputs, initial_state=initial_state, mask=mask, training=training)
            sequence, final_states = results[0], list(results[1:])
            parts = ops.split(sequence, 1 + len(self.extras), axis=-1)
            output = parts[0]  # [batch, time, units]
            step_mask = None
            if mask is not None:
                step_mask = ops.cast(mask, "bool")  # [batch, time], input order
                if self.rnn.go_backwards:
                    step_mask = ops.flip(step_mask, axis=1)
                if self.zero_output_for_mask:
                    output = ops.where(_expand_like(step_mask, output), output, ops.zeros_like(output))
            if not self.return_sequences:
                output = output[:, -1]
            outputs = [output]
            if self.return_state:
                outputs += final_states
            for quantity in self.exposed:
                sequence_q = parts[0] if quantity == "h" else parts[1 + self.extras.index(quantity)]
                if step_mask is not None and quantity in self.state_index:
                    sequence_q = _carry_initial_state(
                        sequence_q, step_mask, initial_state, self.state_index[quantity]
                    )
                outputs.append(sequence_q)
            if self.expose_mask:
                if step_mask is None:
                    step_mask = ops.ones_like(parts[0][..., 0])
                outputs.append(ops.cast(step_mask, "float32"))
            return outputs

        def compute_mask(self, inputs, mask=None):
            mask = _first_mask(mask)
            count = 1 + (self.num_states if self.return_state else 0) + len(self.exposed) + int(self.expose_mask)
            output_mask = mask if self.return_sequences else None
            return [output_mask] + [None] * (count - 1)

        def reset_states(self):
            self.rnn.reset_states()

        def get_config(self):
            return {
                **super().get_config(),
                "rnn": layers.serialize(self.rnn),
                "extras": list(self.extras),
                "exposed": list(self.exposed),
                "state_index": dict(self.state_index),
                "return_sequences": self.return_sequences,
                "return_state": self.return_state,
                "zero_output_for_mask": self.zero_output_for_mask,
                "expose_mask": self.expose_mask,
            }

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            # Legacy .h5 configs name the cell by its bare class name: resolve it here.
            known = {"TracedLSTMCell": TracedLSTMCell, **(custom_objects or {})}
            config["rnn"] = layers.deserialize(config["rnn"], custom_objects=known)
            return cls(**config)

    class TracedBidirectional(layers.Layer):
        """A ``Bidirectional`` call rewritten as two TracedRNN calls and the same merge.

        Outputs: ``[*merged (1, or 2 for merge_mode=None), *forward_states, *backward_states
        (if return_state), *forward_exposed, *backward_exposed, masks]``. Backward sequences
        are flipped back to input time, exactly as ``Bidirectional`` aligns its backward output.
        """

        def __init__(self, forward, backward, merge_mode="concat", return_sequences=False,
                     return_state=False, **kwargs):
            super().__init__(**kwargs)
            self.forward = forward
            self.backward = backward
            self.merge_mode = merge_mode
            self.return_sequences = return_sequences
            self.return_state = return_state
            self.supports_masking = True

        def build(self, input_shape):
            for layer in (self.forward, self.backward):
                if not layer.built:
                    with name_scope(layer.name):
                        layer.build(input_shape)
            self.built = True

        def _split_results(self, results, layer):
            states = layer.num_states if self.return_state else 0
            output, finals = results[0], list(results[1:1 + states])
            extra = list(results[1 + states:])
            return output, finals, extra

        def call(self, inputs, initial_state=None, mask=None, training=None):
            mask = _first_mask(mask)
            forward_state = backward_state = None
            if initial_state is not None:
                half = len(initial_state) // 2
                forward_state, backward_state = list(initial_state[:half]), list(initial_state[half:])
            y, forward_finals, forward_extra = self._split_results(
                self.forward(inputs, initial_state=forward_state, mask=mask, training=training), self.forward)
            y_rev, backward_finals, backward_extra = self._split_results(
                self.backward(inputs, initial_state=backward_state, mask=mask, training=training), self.backward)
            if self.return_sequences:
                y_rev = ops.flip(y_rev, axis=1)
            if self.merge_mode == "concat":
                merged = [ops.concatenate([y, y_rev], axis=-1)]
            elif self.merge_mode == "sum":
                merged = [y + y_rev]
            elif self.merge_mode == "ave":
                merged = [(y + y_rev) / 2]
            elif self.merge_mode == "mul":
                merged = [y * y_rev]
            else:
                merged = [y, y_rev]
            finals = forward_finals + backward_finals if self.return_state else []
            # The backward layer runs over reversed time; align its sequences with input time.
            backward_extra = [ops.flip(t, axis=1) for t in backward_extra]
            return merged + finals + forward_extra + backward_extra

        def compute_mask(self, inputs, mask=None):
            mask = _first_mask(mask)
            merged = 2 if self.merge_mode is None else 1
            states = (self.forward.num_states + self.backward.num_states) if self.return_state else 0
            extras = sum(len(l.exposed) + int(l.expose_mask) for l in (self.forward, self.backward))
            output_mask = mask if self.return_sequences else None
            return [output_mask] * merged + [None] * (states + extras)

        def reset_states(self):
            self.forward.reset_states()
            self.backward.reset_states()

        def get_config(self):
            return {
                **super().get_config(),
                "forward": self.forward.get_config(),
                "backward": self.backward.get_config(),
                "merge_mode": self.merge_mode,
                "return_sequences": self.return_sequences,
                "return_state": self.return_state,
            }

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            config["forward"] = TracedRNN.from_config(config["forward"], custom_objects)
            config["backward"] = TracedRNN.from_config(config["backward"], custom_objects)
            return cls(**config)

    def _first_mask(mask):
        # tf-keras hands a list of masks when initial states are folded into the inputs.
        if isinstance(mask, (list, tuple)):
            return mask[0] if mask else None
        return mask

    def _expand_like(step_mask, tensor):
        # [batch, time] -> [batch, time, 1, ...] to broadcast over the state's trailing axes.
        expanded = step_mask
        for _ in range(len(tensor.shape) - 2):
            expanded = ops.expand_dims(expanded, -1)
        return expanded

    def _carry_initial_state(sequence, step_mask, initial_state, index):
        # The RNN loop repeats its previous *output* on masked steps, and that output is zero before
        # the first valid step; the state carried there is the initial state. Put it back.
        seen = ops.cumsum(ops.cast(step_mask, "int32"), axis=1) > 0  # [batch, time]
        if initial_state is not None:
            start = ops.expand_dims(ops.cast(initial_state[index], sequence.dtype), 1)
            start = start + ops.zeros_like(sequence)
        else:
            start = ops.zeros_like(sequence)
        return ops.where(_expand_like(seen, sequence), sequence, start)

    return {
        "TracedLSTMCell": TracedLSTMCell,
        "TracedRNN": TracedRNN,
        "TracedBidirectional": TracedBidirectional,
    }
