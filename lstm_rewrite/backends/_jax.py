"""Where Keras 3 computes on JAX: the traced layers' recurrent loop, and capture's compiled predict.

Keras's JAX loop (keras/src/backend/jax/rnn.py) stacks each step's outputs time-major and
transposes every sequence to ``[batch, time, ...]`` after the loop: for each exposed sequence one
more pass over memory (a scan over a medium LSTM's step returning every state: 1.49x the time of
one returning h, against 1.28x when the loop writes each step straight into its batch-major
place). It also repeats ``states[0]`` on masked steps, which is
not a traced cell's output. `parts_loop` writes every step's outputs into ``[batch, time, ...]``
buffers carried through the loop, and on masked steps repeats the last valid output (zero before
the first), as TensorFlow's and torch's loops do.

`compiled_predict` is the jitted forward pass without ``predict_on_batch``'s per-call set-up and
state sync (with a compile per ``cell_states`` call, since kept by `backends.cached_on_model`,
they held capture of a medium LSTM to 2932 sequences per second against 8719 for the jitted call;
now 6282).

Only `lstm_rewrite.backends.keras3` imports this module, on the JAX backend.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from keras.src.backend.common import stateless_scope


def _broadcast_mask(step_mask, tensor):
    """``[batch]`` booleans -> ``[batch, 1, ...]`` to select over ``tensor``."""
    return jnp.reshape(step_mask, step_mask.shape + (1,) * (tensor.ndim - 1))


def parts_loop(step_function, inputs, initial_states, mask=None, go_backwards=False, unroll=False,
               input_time=False, shapes_function=None):
    """Run ``step_function(inputs_t, states) -> (outputs_t, new_states)`` over ``inputs``'s time axis.

    Returns ``(last_output, outputs, final_states)`` as ``keras.ops.rnn`` does for batch-major
    inputs and every step's outputs, with ``outputs`` (each a tree like ``outputs_t``) ``[batch, time, ...]`` in processing
    order (reversed input time for ``go_backwards``), or aligned with input time with
    ``input_time`` (a Bidirectional's backward half: each step written where it belongs, no flip
    after the loop). A masked step keeps the states and repeats the previous step's outputs (an
    output that is one of the step's states: the carried state). ``shapes_function``: the step
    as it gives the same shapes with nothing kept from its trace (no dropout: a cell keeps the
    masks it draws, which must not outlive that trace); ``step_function`` if None.
    """
    inputs_by_time = jnp.swapaxes(inputs, 0, 1)  # [time, batch, ...]: what scan slices
    mask_by_time = None if mask is None else jnp.swapaxes(mask.astype(bool), 0, 1)
    steps = inputs_by_time.shape[0]
    # (Where the time axis is symbolic, while Keras infers shapes, the sequences are flipped after
    # the loop instead: the same shapes.)
    write_backwards = input_time and go_backwards and isinstance(steps, int)

    def run_step(inputs_t, mask_t, states, previous):
        outputs_t, new_states = step_function(inputs_t, states)
        # The carry must keep its structure: cells hand back lists where they took tuples.
        new_states = jax.tree.unflatten(jax.tree.structure(states), jax.tree.leaves(new_states))
        if mask_t is None:
            return outputs_t, new_states
        keep = lambda new, old: jnp.where(_broadcast_mask(mask_t, new), new, old)  # noqa: E731
        computed = jax.tree.leaves(new_states)
        new_states = jax.tree.map(keep, new_states, states)
        kept = jax.tree.leaves(new_states)
        masked = []
        for output, before in zip(jax.tree.leaves(outputs_t), jax.tree.leaves(previous)):
            same = [k for k, state in enumerate(computed) if state is output]
            if same:
                # An output that is a state (an LSTM's h and c) repeats the carried state: the
                # previous output after a valid step, and before one the initial state, which
                # Keras's loop gives for the output and the traced layer for an exposed state.
                masked.append(kept[same[0]])
            else:
                masked.append(keep(output, before))
        return jax.tree.unflatten(jax.tree.structure(outputs_t), masked), new_states

    def write(buffers, outputs_t, t):
        position = steps - 1 - t if write_backwards else t
        return jax.tree.map(
            lambda buffer, value: lax.dynamic_update_index_in_dim(buffer, value, position, axis=1),
            buffers, outputs_t)

    def step(carry, scanned):
        t, states, previous, buffers = carry
        inputs_t, mask_t = scanned if mask_by_time is not None else (scanned, None)
        outputs_t, new_states = run_step(inputs_t, mask_t, states, previous)
        return (t + 1, new_states, outputs_t, write(buffers, outputs_t, t)), None

    states = tuple(initial_states)
    scope = contextlib.nullcontext() if stateless_scope.in_stateless_scope() else stateless_scope.StatelessScope()
    with scope:
        # The step's output shapes, from an abstract trace: nothing of it enters the program (a
        # first step run before the loop instead compiled the step twice).
        output_specs, _ = jax.eval_shape(shapes_function or step_function, inputs_by_time[0], states)
        buffers = jax.tree.map(lambda s: jnp.zeros((s.shape[0], steps) + s.shape[1:], s.dtype), output_specs)
        previous = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), output_specs)
        scanned = inputs_by_time if mask is None else (inputs_by_time, mask_by_time)
        (_, final_states, last_output, outputs), _ = lax.scan(
            step, (0, states, previous, buffers), scanned, reverse=go_backwards,
            unroll=steps if unroll and isinstance(steps, int) else 1)
    if input_time and go_backwards and not write_backwards:
        outputs = jax.tree.map(lambda sequence: jnp.flip(sequence, axis=1), outputs)
    return last_output, outputs, list(final_states)


def compiled_predict(model):
    """``model``'s jitted forward pass: ``f([input arrays]) -> [NumPy outputs]``, traced again only
    for a new shape. The variables are read at each call (Keras's JAX ``predict`` donates their
    arrays), and the updated non-trainable ones (a stateful RNN's states) written back, as
    ``predict_on_batch`` does."""
    forward = jax.jit(lambda trainable, other, inputs: model.stateless_call(trainable, other, inputs, training=False))

    def call(arrays):
        arrays = list(arrays)
        outputs, other = forward([v.value for v in model.trainable_variables],
                                 [v.value for v in model.non_trainable_variables],
                                 arrays[0] if len(arrays) == 1 else arrays)
        for variable, value in zip(model.non_trainable_variables, other):
            variable.assign(value)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        # Copies: NumPy views of JAX arrays are read-only, and capture hands its arrays to users.
        return [np.array(o) for o in outputs]

    return call
