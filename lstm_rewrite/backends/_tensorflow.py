"""What both flavours do the same way where TensorFlow computes: a compiled predict for capture,
``tf.data`` input, the TFRecord reader, the GPU check, and the graph helpers the traced layers take
from a TensorFlow backend (`GRAPH_HELPERS`).

Only the backends import this module (it imports TensorFlow): tf-keras always, Keras 3 only on its
TensorFlow backend or once a ``tf.data.Dataset`` exists, and `backends.read_tfrecord` when a
TFRecord file is read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from ..errors import DataError

# --- capture: a compiled predict, tf.data input ------------------------------------------------


def tf_function_predict(model, signature):
    """``model``'s forward pass as one ``tf.function`` over every batch, returning NumPy arrays.

    Batch size (the last batch is smaller) and, where the model allows it, sequence length stay
    open in the signature, so the recurrent loop is traced once instead of once per shape.

    Args:
        model: a Keras model (either flavour) whose outputs are wanted.
        signature: per input, ``(shape with None for open axes, dtype)``.
    """
    spec = [[tf.TensorSpec(shape, tf.as_dtype(dtype)) for shape, dtype in signature]]

    @tf.function(input_signature=spec)
    def run(inputs):
        result = model(inputs, training=False)
        return result if isinstance(result, (list, tuple)) else [result]

    return lambda arrays: [np.asarray(t) for t in run(list(arrays))]


def is_dataset(data) -> bool:
    """Whether ``data`` is a ``tf.data.Dataset``."""
    return isinstance(data, tf.data.Dataset)


def dataset_batches(dataset, batch_size: int,
                    is_batched: Callable[[Any], bool]) -> tuple[int | None, Callable[[], Iterator]]:
    """A dataset as NumPy batches (see `lstm_rewrite.backends.Backend.dataset_batches`)."""
    if not is_batched(dataset.element_spec):
        dataset = dataset.batch(batch_size)
    cardinality = int(dataset.cardinality())
    return (None if cardinality < 0 else cardinality), dataset.as_numpy_iterator


def read_tfrecord(path: str) -> Iterator[Mapping[str, Any]]:
    """The features of each ``tf.train.Example`` in a TFRecord file (see `backends.read_tfrecord`)."""
    # TensorFlow's reader checks the records' CRCs (Beam's would need its [tfrecord] extra) and
    # reads gs:// paths itself.
    compression = "GZIP" if path.lower().endswith(".gz") else ""
    records = iter(tf.data.TFRecordDataset(path, compression_type=compression).as_numpy_iterator())
    for row in itertools.count():
        try:
            record = next(records)
        except StopIteration:
            return
        except tf.errors.OpError as exc:  # a truncated or corrupt file
            raise DataError(f"Cannot read record {row} of the TFRecord file {path!r} ({type(exc).__name__}: "
                            f"{exc.message}). Pass TFRecord files of serialized tf.train.Example. "
                            f"Received: {path!r}") from None
        try:
            features = tf.train.Example.FromString(record).features.feature
        except Exception as exc:  # a DecodeError: not a serialized tf.train.Example
            raise DataError(f"Record {row} of {path!r} is not a serialized tf.train.Example ({exc}). "
                            f"Write the TFRecord from tf.train.Example protos. Received: {len(record)} bytes") from None
        yield features


# --- GPU detection ------------------------------------------------------------------------------


def gpu_visible() -> bool:
    """Whether TensorFlow computes on a GPU."""
    return bool(tf.config.list_logical_devices("GPU"))


# --- graph helpers for the traced layers (lstm_rewrite.layers.Flavour) -----------------------------


def _placeholder(shape, dtype):
    return tf.raw_ops.Placeholder(dtype=tf.as_dtype(dtype), shape=shape)


def graph_placeholder(tensor):
    """``make(shape, dtype)`` for a tensor of a TensorFlow graph (one placeholder op, where zeros of a
    dynamic batch size cost five), else None."""
    if tf.is_tensor(tensor) and tf.is_symbolic_tensor(tensor):
        return _placeholder
    return None


def plain_python(call):
    """Keep autograph away from a layer's ``call`` that has no tensor-dependent control flow.

    tf-keras converts every subclassed layer's ``call`` with autograph while building a functional
    model, and the conversion (of ``call`` and of every function it calls) cost more than the rest
    of the rewrite.
    """
    return tf.autograph.experimental.do_not_convert(call)


def doubling_loop(round_, a, b):
    """``a, b = round_(a, b, shift, count)`` for shift = 1, 2, 4, ... below ``count``, the time
    length of ``a`` (axis 1), in a ``tf.while_loop``: for a graph whose length is unknown while
    tracing. Returns the last b."""
    count = tf.shape(a)[1]

    def body(shift, a, b):
        new_a, new_b = round_(a, b, shift, count)
        new_a.set_shape(a.shape)
        new_b.set_shape(b.shape)
        return shift * 2, new_a, new_b

    _, _, b = tf.while_loop(lambda shift, a, b: shift < count, body, (tf.constant(1), a, b))
    return b


GRAPH_HELPERS = {"graph_placeholder": graph_placeholder, "plain_python": plain_python,
                 "doubling_loop": doubling_loop}
