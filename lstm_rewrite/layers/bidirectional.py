"""TracedBidirectional: a ``Bidirectional`` call rewritten as two traced directions and its merge."""

from __future__ import annotations

from .flavour import plain_python
from .masking import first_mask


class TracedBidirectional:
    """A ``Bidirectional`` call rewritten as two TracedRNN calls and the same merge.

    Outputs: ``[*merged (1, or 2 for merge_mode=None), *forward_states, *backward_states
    (if return_state), *forward_exposed, *backward_exposed, masks]``. Backward sequences
    are flipped back to input time, exactly as ``Bidirectional`` aligns its backward output.
    """

    def __init__(self, forward, backward, merge_mode="concat", return_sequences=False,
                 return_state=False, **kwargs):
        super().__init__(**kwargs)
        # Not `self.forward`: on the torch backend a layer is a torch Module, whose forward()
        # that name would shadow.
        self.forward_layer = forward
        self.backward_layer = backward
        self.merge_mode = merge_mode
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.supports_masking = True

    def build(self, input_shape):
        for layer in (self.forward_layer, self.backward_layer):
            if not layer.built:
                with self.flavour.name_scope(layer.name):
                    layer.build(input_shape)
        self.built = True

    def _split_results(self, results, layer):
        states = layer.num_states if self.return_state else 0
        output, finals = results[0], list(results[1:1 + states])
        extra = list(results[1 + states:])
        return output, finals, extra

    @plain_python
    def call(self, inputs, initial_state=None, mask=None, training=None, edit_inputs=None):
        ops = self.flavour.ops
        mask = first_mask(mask)
        forward_state = backward_state = None
        if initial_state is not None:
            half = len(initial_state) // 2
            forward_state, backward_state = list(initial_state[:half]), list(initial_state[half:])
        # Call-time edit inputs: the forward direction's first, then the backward's.
        split = len(getattr(self.forward_layer, "edit_channels", None) or [])
        edit_inputs = list(edit_inputs or [])
        forward_edits = {"edit_inputs": edit_inputs[:split]} if split else {}
        backward_edits = {"edit_inputs": edit_inputs[split:]} if edit_inputs[split:] else {}
        y, forward_finals, forward_extra = self._split_results(
            self.forward_layer(inputs, initial_state=forward_state, mask=mask, training=training, **forward_edits),
            self.forward_layer)
        # The backward layer runs over reversed time; its sequences are aligned with input time,
        # by the layer itself where it can (its loop then writes them so).
        aligned = getattr(self.backward_layer, "aligns_input_time", False)
        if aligned:
            backward_edits = {**backward_edits, "input_time": True}
        y_rev, backward_finals, backward_extra = self._split_results(
            self.backward_layer(inputs, initial_state=backward_state, mask=mask, training=training,
                                **backward_edits),
            self.backward_layer)
        if self.return_sequences and not aligned:
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
        if not aligned:
            backward_extra = [ops.flip(t, axis=1) for t in backward_extra]
        return merged + finals + forward_extra + backward_extra

    def compute_mask(self, inputs, mask=None):
        mask = first_mask(mask)
        merged = 2 if self.merge_mode is None else 1
        states = (self.forward_layer.num_states + self.backward_layer.num_states) if self.return_state else 0
        extras = sum(len(l.exposed) + int(l.expose_mask) for l in (self.forward_layer, self.backward_layer))
        output_mask = mask if self.return_sequences else None
        return [output_mask] * merged + [None] * (states + extras)

    def reset_states(self):
        self.forward_layer.reset_states()
        self.backward_layer.reset_states()

    def reset_state(self):  # Keras 3's name for it
        self.reset_states()

    def get_config(self):
        return {
            **super().get_config(),
            "forward": self.forward_layer.get_config(),
            "backward": self.backward_layer.get_config(),
            "merge_mode": self.merge_mode,
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        traced_rnn = cls.flavour.classes["TracedRNN"]
        config["forward"] = traced_rnn.from_config(config["forward"], custom_objects)
        config["backward"] = traced_rnn.from_config(config["backward"], custom_objects)
        return cls(**config)
