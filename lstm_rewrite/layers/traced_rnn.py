"""TracedRNN: a recurrent layer call rewritten to return its per-step states as well.

It wraps an inner ``RNN`` over a traced cell (`lstm_rewrite.layers.cells`) and rebuilds what the
original layer returned from the cell's ``concat([output, *extras])`` sequence, then appends the
exposed sequences. Written against ``self.flavour`` and bound to each flavour's ``Layer`` by
`lstm_rewrite.layers.bind`.
"""

from __future__ import annotations

import math

from . import edits
from .cells import reset_dropout_masks, traced_cells
from .flavour import plain_python
from .masking import carry_initial_state, expand_like, fill_masked, first_mask
from .shapes import shapes_only_active, zero_initializers, zeros_for_rnn


class WrapsRecurrentLayer:
    """What the traced and reconstructed layers share: each wraps an inner recurrent layer
    ``self.rnn`` and returns ``[output, *final_states (if return_state), *exposed, mask (if
    expose_mask)]``, of which only the output carries the input's mask."""

    @property
    def go_backwards(self):
        return self.rnn.go_backwards

    def compute_mask(self, inputs, mask=None):
        mask = first_mask(mask)
        count = 1 + (self.num_states if self.return_state else 0) + len(self.exposed) + int(self.expose_mask)
        output_mask = mask if self.return_sequences else None
        return [output_mask] + [None] * (count - 1)

    def reset_states(self):
        self.rnn.reset_states()

    def reset_state(self):  # Keras 3's name for it
        self.reset_states()


def plain_lists(structure):
    """``structure`` with every list or tuple inside as a plain list."""
    if isinstance(structure, (list, tuple)):
        return [plain_lists(item) for item in structure]
    return structure


class TracedRNN(WrapsRecurrentLayer):
    """A recurrent layer call rewritten to also return its per-step states.

    Wraps ``rnn``, an ``RNN`` over a traced cell configured with ``return_sequences=True``,
    ``return_state=True`` and ``zero_output_for_mask=False``, so that every step's
    ``concat([output, *extras])`` survives. ``call`` rebuilds what the original layer
    returned (honouring its own ``return_sequences``, ``return_state`` and
    ``zero_output_for_mask``) and appends the exposed sequences:

        [output, *final_states (if return_state), *exposed, mask (if expose_mask)]

    Exposed sequences are ``[batch, time, ...]`` in the layer's processing order (the order of
    its own ``return_sequences`` output, so reversed input time for ``go_backwards``).

    Args:
        rnn: the inner ``RNN``.
        extras: names of the parts after the output, in order.
        exposed: the names to return, each in ``extras`` or equal to ``output_alias``.
        state_index: name -> position in the flat initial-state list, for the names that are
            recurrent states (they are carried on masked steps).
        output_alias: the name the output part stands for ("h"), or None.
        part_sizes: widths of ``[output, *extras]``; None for equal widths.
        part_shapes: per part, its per-step shape to reshape to (None: keep it flat).
        state_shapes: per flat state, its per-step shape when the inner RNN keeps it flat.
        state_count: how many final states the layer returns with ``return_state``.
        edit_channels: the widths of the call-time tensors (``edit_inputs``) an edited cell reads
            (`lstm_rewrite.layers.edits`); None when the cell has no edits.
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
        output_alias="h",
        part_sizes=None,
        part_shapes=None,
        state_shapes=None,
        state_count=None,
        edit_channels=None,
        unroll=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rnn = rnn
        # None when the cell has no edits (and then its input is not widened).
        self.edit_channels = None if edit_channels is None else [int(w) for w in edit_channels]
        self.extras = tuple(extras)
        self.exposed = tuple(exposed)
        self.state_index = dict(state_index or {})
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.zero_output_for_mask = zero_output_for_mask
        self.expose_mask = expose_mask
        self.output_alias = output_alias
        self.part_sizes = None if part_sizes is None else [int(s) for s in part_sizes]
        self.part_shapes = None if part_shapes is None else [
            None if s is None else tuple(int(d) for d in s) for s in part_shapes]
        self.state_shapes = None if state_shapes is None else [tuple(int(d) for d in s) for s in state_shapes]
        self.state_count = state_count
        self.supports_masking = True
        # The inner loop's masked steps, decided by the backend that runs it (a file saved under
        # one backend loads under another): where the loop repeats the previous output it keeps
        # every step's parts as they are; elsewhere it zeroes masked steps, the same on every
        # backend, and `fill_masked` repeats the last valid step's parts as such a loop would.
        # A masked step output must then be one tensor (the loop zeroes it with one `where`): see
        # `_choose_layout`.
        self.loop_repeats_output = getattr(rnn, "repeats_previous_output", self.flavour.masked_steps_repeat_output)
        self.rnn.zero_output_for_mask = not self.loop_repeats_output
        # Keras's unrolled loops treat masked steps unlike its other loops (JAX's never zeroes
        # them; the others zero a go_backwards layer's outputs by the mask in input order) and
        # stack a step's outputs into one tensor. The inner loop never unrolls (the states are
        # the same); `call` gives the output what the original's unrolled loop gives it.
        self.unroll = bool(getattr(rnn, "unroll", False)) if unroll is None else bool(unroll)
        self.rnn.unroll = False

    def build(self, input_shape):
        # Build the inner RNN here, not lazily in call: Keras 3 traces call in a stateless scope
        # where a stateful RNN could not create its state variables.
        if self.edit_channels is not None:
            # The edited cell reads concat([x, t, *edit channels]) at each step.
            input_shape = edits.widened_input_shape(input_shape, self.edit_channels)
        if not self.rnn.built:
            if shapes_only_active():
                # The rewrite copies the original weights in right after: skip the initializers.
                with zero_initializers(self.flavour, self.rnn.cell):
                    self.rnn.build(input_shape)
            else:
                self.rnn.build(input_shape)
        self.built = True

    @property
    def num_states(self):
        if self.state_count is not None:
            return self.state_count
        return len(self.state_index) if self.state_index else 2

    def _parts(self, sequence):
        """Slice ``[batch, time, width]`` into ``[output, *extras]``, reshaped per step.

        A cell with split outputs gives the parts already apart, as a list; or, in a Keras 3
        model saved by 0.1.0 (whose inner layer is Keras's own ``RNN``, which casts the list
        to one tensor), stacked as ``[part, batch, time, units]``.
        """
        if isinstance(sequence, (list, tuple)):
            return list(sequence)
        if len(sequence.shape) == 4 and self.part_shapes is None and self.part_sizes is None:
            return [sequence[k] for k in range(int(sequence.shape[0]))]
        parts, start = [], 0
        lead = None
        for shape in self._step_shapes(int(sequence.shape[-1])):
            size = math.prod(shape)
            part = sequence[..., start:start + size]
            start += size
            if len(shape) > 1:
                if lead is None:
                    lead = tuple(self.flavour.ops.shape(sequence)[:2])
                part = self.flavour.ops.reshape(part, lead + shape)  # [batch, time, *shape]
            parts.append(part)
        return parts

    def _step_shapes(self, width):
        """Per part of ``[output, *extras]``, its per-step shape, given their total ``width``."""
        count = 1 + len(self.extras)
        sizes = self.part_sizes or [width // count] * count
        return [self.part_shapes[k] if self.part_shapes and self.part_shapes[k] is not None else (size,)
                for k, size in enumerate(sizes)]

    def _inner_states(self, states):
        """The flat list of initial states as the inner RNN takes them: flattened per state
        for a convolutional cell, nested like the cell's state_size for stacked cells."""
        if states is None:
            return None
        tree = self.flavour.tree
        if self.state_shapes:
            states = [self.flavour.ops.reshape(s, (-1, math.prod(shape))) for s, shape in zip(states, self.state_shapes)]
        structure = self.rnn.cell.state_size
        if isinstance(structure, (list, tuple)) and len(tree.flatten(structure)) != len(structure):
            # tf-keras counts initial states per cell of a stack. Plain lists: JAX refuses
            # Keras's tracked lists as loop carries.
            states = tree.pack_sequence_as(plain_lists(structure), list(states))
        return states

    def _choose_layout(self, mask) -> None:
        """Let a cell with split outputs hand the loop its parts apart for this call, except where
        the loop needs one tensor per step: Keras's JAX and NumPy loops zero a masked step's output
        with one `where` and flip a backwards layer's outputs as one array, and NumPy's loop
        stacks a tuple into one array. There the step concatenates its parts and `_parts` slices
        them apart; the saved config (``split_outputs``) is the same either way."""
        cell, flavour = self.rnn.cell, self.flavour
        if hasattr(cell, "emit_split"):
            cell.emit_split = self.loop_repeats_output or (
                flavour.loop_keeps_tuples and mask is None and not self.rnn.go_backwards)

    def _output_zeroing_mask(self, mask, step_mask):
        """Which steps of the output sequence Keras's loop zeroes (``zero_output_for_mask``): the
        valid steps in processing order, except in an unrolled go_backwards loop, which reads the
        mask in input order (keras/src/backend/tensorflow/rnn.py and torch's, tf-keras's backend)."""
        if self.unroll and self.rnn.go_backwards:
            return self.flavour.ops.cast(mask, "bool")
        return step_mask

    # ``call(..., input_time=True)`` returns a go_backwards layer's sequences aligned with input
    # time (`TracedBidirectional` asks for it).
    aligns_input_time = True

    @plain_python
    def call(self, inputs, initial_state=None, mask=None, training=None, edit_inputs=None, input_time=False):
        ops, flavour = self.flavour.ops, self.flavour
        mask = first_mask(mask)
        reset_dropout_masks(self.rnn.cell)
        if self.edit_channels is not None:
            inputs = edits.with_edit_channels(ops, self, inputs, edit_inputs)
        self._choose_layout(mask)
        backwards = self.rnn.go_backwards
        # A loop that writes input time itself saves a flip of every sequence after it (on JAX).
        # Not for an unrolled layer: Keras's unrolled loop zeroes masked outputs in its own way.
        written_in_input_time = bool(input_time and backwards and not self.unroll and self.loop_repeats_output
                                     and getattr(self.rnn, "writes_input_time", False))
        if shapes_only_active():
            results = zeros_for_rnn(flavour, self.rnn, inputs, self._step_shapes)
        if not shapes_only_active() or results is None:
            loop_kwargs = {"input_time": True} if written_in_input_time else {}
            results = self.rnn(inputs, initial_state=self._inner_states(initial_state), mask=mask,
                               training=training, **loop_kwargs)
        sequence, final_states = results[0], list(flavour.tree.flatten(list(results[1:])))
        if self.state_shapes:
            final_states = [ops.reshape(s, (-1,) + shape) for s, shape in zip(final_states, self.state_shapes)]
        parts = self._parts(sequence)
        step_mask = None
        if mask is not None:
            step_mask = ops.cast(mask, "bool")  # [batch, time], input order
            if backwards and not written_in_input_time:
                step_mask = ops.flip(step_mask, axis=1)  # the sequences' order
            if self.rnn.zero_output_for_mask:
                parts = fill_masked(ops, parts, step_mask)
            if not flavour.masked_steps_repeat_output and initial_state is not None and \
                    tuple(initial_state[0].shape[1:]) == tuple(parts[0].shape[2:]):
                # The original layer ran Keras's loop, which repeats states[0] there: the initial
                # h before the first valid step. A stacked or custom cell's output is not its
                # states[0], and verification says if that differs.
                parts = [carry_initial_state(ops, parts[0], step_mask, initial_state, 0, written_in_input_time),
                         *parts[1:]]
        output = parts[0]  # [batch, time, ...]
        last = slice(0, 1) if written_in_input_time else slice(-1, None)  # the last step processed
        if not self.return_sequences:
            output = output[:, last]
        if step_mask is not None and self.zero_output_for_mask and not (
                self.unroll and not self.flavour.unrolled_loop_zeroes_masked_output):
            zeroing = self._output_zeroing_mask(mask, step_mask) if self.return_sequences else step_mask[:, last]
            output = ops.where(expand_like(ops, zeroing, output), output, ops.zeros_like(output))
        if not self.return_sequences:
            output = output[:, 0]
        outputs = [output]
        if self.return_state:
            outputs += final_states
        for quantity in self.exposed:
            if quantity in self.extras:
                sequence_q = parts[1 + self.extras.index(quantity)]
            else:
                sequence_q = parts[0]  # the output_alias
            # Without an initial state the loop's zero output before the first valid step is
            # already the zero state carried there: nothing to put back (and 3 passes saved).
            # Except for the output part: tf-keras hangs masks on tensor objects, so the
            # exposed copy must be a tensor of its own or it would take the output's mask.
            carry = initial_state is not None or sequence_q is parts[0]
            if step_mask is not None and quantity in self.state_index and carry:
                sequence_q = carry_initial_state(ops, sequence_q, step_mask, initial_state,
                                                 self.state_index[quantity], written_in_input_time)
            outputs.append(sequence_q)
        if self.expose_mask:
            if step_mask is None:
                step_mask = parts[0]
                while len(step_mask.shape) > 2:
                    step_mask = step_mask[..., 0]  # [batch, time]
                step_mask = ops.ones_like(step_mask)
            outputs.append(ops.cast(step_mask, "float32"))
        if input_time and backwards and not written_in_input_time:
            # Every sequence (the output with return_sequences, the exposed ones, the mask) to
            # input time; the final states stay.
            states_end = 1 + (len(final_states) if self.return_state else 0)
            head = [ops.flip(outputs[0], axis=1) if self.return_sequences else outputs[0], *outputs[1:states_end]]
            outputs = head + [ops.flip(t, axis=1) for t in outputs[states_end:]]
        return outputs

    def compute_output_spec(self, inputs, initial_state=None, mask=None, training=None, edit_inputs=None,
                            input_time=False):
        # Keras 3 finds a layer's output specs by tracing ``call`` into a scratch graph, ops
        # that cost ~0.5 ms each to create. Within `shapes_only`, ``call`` runs on the symbolic
        # inputs themselves instead: Keras 3's ops infer shapes in Python, and the whole call
        # creates no graph op (a third of the rewrite's time for a chain of LSTMs).
        symbolic = self.flavour.symbolic_tensor
        if shapes_only_active() and symbolic is not None and isinstance(inputs, symbolic):
            outputs = self.call(inputs, initial_state=initial_state, mask=mask, training=training,
                                edit_inputs=edit_inputs, input_time=input_time)
            # One new tensor per output: call may return one tensor twice (the output and the
            # exposed h), and Keras maps a node's outputs by identity when it runs the graph.
            return [symbolic(t.shape, dtype=t.dtype) for t in outputs]
        extra = {} if edit_inputs is None else {"edit_inputs": edit_inputs}
        if input_time:
            extra["input_time"] = True
        return super().compute_output_spec(inputs, initial_state=initial_state, mask=mask, training=training,
                                           **extra)

    def get_config(self):
        config = {
            **super().get_config(),
            "rnn": self.flavour.keras.layers.serialize(self.rnn),
            "extras": list(self.extras),
            "exposed": list(self.exposed),
            "state_index": dict(self.state_index),
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "zero_output_for_mask": self.zero_output_for_mask,
            "expose_mask": self.expose_mask,
            "output_alias": self.output_alias,
            "state_count": self.state_count,
            "unroll": self.unroll,
        }
        if self.edit_channels is not None:
            config["edit_channels"] = list(self.edit_channels)
        if self.part_sizes is not None:
            config["part_sizes"] = list(self.part_sizes)
        if self.part_shapes is not None:
            config["part_shapes"] = [None if s is None else list(s) for s in self.part_shapes]
        if self.state_shapes is not None:
            config["state_shapes"] = [list(s) for s in self.state_shapes]
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # Legacy .h5 configs name the cells by their bare class names: resolve them here.
        known = {**traced_cells(cls.flavour), **(custom_objects or {})}
        config["rnn"] = cls.flavour.keras.layers.deserialize(config["rnn"], custom_objects=known)
        return cls(**config)
