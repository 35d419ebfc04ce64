"""Backends: the only modules that import tensorflow, keras or tf_keras; here, the interface they share.

Keras 3 and tf-keras spell the same functional graph differently. Each flavour has one backend
module (``keras3``, ``tfkeras``) that hides the difference behind the names `Backend` lists, so the
stages never ask which flavour they work on: they take ``backends.for_model(model)`` and call it.
What TensorFlow does the same way for both flavours (a ``tf.function`` predict, ``tf.data``, the
TFRecord reader, its GPU check) lives once, in ``_tensorflow``, which only a backend imports.

This package itself imports no framework: the stages import it freely, and a flavour's module is
imported on first use. Besides the interface it offers what needs no flavour: `flavour_of`, `get`,
`for_model`, `keras_module`, `import_tensorflow` and `read_tfrecord`.

Example:
    >>> backend = for_model(model)
    >>> [type(layer).__name__ for layer in model.layers if isinstance(layer, backend.RNN)]
    ['LSTM']
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, ContextManager, Protocol, runtime_checkable

__all__ = ["Backend", "FLAVOURS", "interface_names", "flavour_of", "get", "for_model", "keras_module",
           "import_tensorflow", "read_tfrecord"]

FLAVOURS = ("keras3", "tfkeras")
_MODULES = {"keras3": "lstm_rewrite.backends.keras3", "tfkeras": "lstm_rewrite.backends.tfkeras"}


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides: every name a stage may read from ``for_model(model)``.

    A module satisfies a protocol through its module-level names (PEP 544, "Modules as
    implementations of protocols"): the methods below are its functions, without ``self``; the
    annotated attributes its classes and namespaces. ``tests/test_architecture.py`` checks that
    both backends provide every name here, that they define nothing public beyond it, and that
    every name a stage reads from a backend is here.
    """

    # --- the flavour ---------------------------------------------------------------------------

    keras: ModuleType
    """The flavour's ``keras`` module (``keras`` for Keras 3, ``tf_keras`` for tf-keras)."""

    # --- layer classes: what the rewrite matches and builds -----------------------------------

    RNN: type
    """The generic recurrent layer; every recurrent layer (LSTM, ConvLSTM, ...) is one."""
    LSTM: type
    """The LSTM layer."""
    LSTMCell: type
    """The LSTM cell."""
    GRU: type
    """The GRU layer."""
    GRUCell: type
    """The GRU cell."""
    SimpleRNN: type
    """The SimpleRNN layer."""
    SimpleRNNCell: type
    """The SimpleRNN cell."""
    ConvLSTM: type
    """The base class of ConvLSTM1D/2D/3D."""
    ConvLSTMCell: type
    """The ConvLSTM cell."""
    StackedRNNCells: type
    """A stack of cells run as one cell."""
    Bidirectional: type
    """The bidirectional wrapper."""
    Wrapper: type
    """The base class of layer wrappers (``TimeDistributed``, ``Bidirectional``, user wrappers)."""
    Embedding: type
    """The embedding layer (its ``input_dim`` bounds synthesized ids)."""
    Masking: type
    """The masking layer (its ``mask_value`` pads synthesized sequences)."""
    Identity: type
    """The identity layer that names each exposed output."""

    # --- traced layer classes: what replaces a recurrent layer ---------------------------------

    TracedLSTMCell: type
    """An LSTM cell that emits its per-step quantities (c, h, gates) beside its output."""
    TracedGRUCell: type
    """A GRU cell that emits h, z, r, n."""
    TracedSimpleRNNCell: type
    """A SimpleRNN cell that emits h."""
    TracedConvLSTMCell: type
    """A ConvLSTM cell that emits its feature-map states and gates."""
    TracedCell: type
    """Any other cell, wrapped to emit its numbered states (state0, state1, ...)."""
    TracedStackedCells: type
    """A StackedRNNCells whose traced cells emit their quantities."""
    TracedRNN: type
    """The traced recurrent layer: the original's outputs, then each exposed sequence."""
    TracedSubclassRNN: type
    """A TracedRNN that runs a user subclass's ``call`` around the traced loop."""
    InnerRNN: type
    """The RNN class a TracedRNN runs its traced cell in."""
    TracedBidirectional: type
    """A Bidirectional over two TracedRNNs."""
    ReconstructedLSTM: type
    """The fast path (``method="reconstruct"``): an LSTM layer's states rebuilt from its outputs."""
    ReconstructedBidirectional: type
    """A TracedBidirectional whose directions may be ReconstructedLSTMs."""

    def linear_scan(self, a: Any, b: Any, initial: Any) -> Any:
        """``x_t = a_t * x_{t-1} + b_t`` over axis 1 from ``initial``, in the backend's ops (the fast path's c)."""

    # --- tensors and ops ----------------------------------------------------------------------

    ops: Any
    """The ops the traced layers compute with, under ``keras.ops`` names (a shim on tf-keras)."""

    def to_numpy(self, value) -> Any:
        """A tensor or variable (of any Keras 3 backend, a CUDA tensor too) as a NumPy array."""

    def dtype_policy(self, layer) -> str:
        """The name of ``layer``'s dtype policy ("float32", "mixed_float16", ...), for its copies."""

    # --- graph access: reading a functional model and building one -----------------------------

    def flatten(self, structure) -> list:
        """The leaves of a nested structure (lists, tuples, dicts), in the flavour's order."""

    def map_structure(self, fn: Callable, structure) -> Any:
        """``structure`` with ``fn`` applied to every leaf."""

    def is_tensor(self, obj) -> bool:
        """Whether ``obj`` is a symbolic Keras tensor of the graph."""

    def is_model(self, layer) -> bool:
        """Whether ``layer`` is a model (a nested model is a layer of its parent)."""

    def functional_of(self, model) -> Any:
        """The functional graph behind ``model``, or None when it has none (subclassed, unbuilt)."""

    def graph_nodes(self, functional) -> Iterator[tuple]:
        """Every node of one functional level: ``(node, layer, args, kwargs, outputs, is_input)``."""

    def inbound_nodes(self, layer) -> list:
        """Every node (call) of ``layer``, in any model."""

    def inputs_structure(self, functional) -> Any:
        """The functional's inputs, nested as it was built (a dict, a list, a tensor)."""

    def outputs_of(self, functional) -> list:
        """The functional's output tensors, in order."""

    def output_names(self, model) -> list[str]:
        """The names of ``model``'s outputs, in order."""

    def arrange_inputs(self, model, arrays: Sequence) -> Any:
        """Flat input arrays (in ``model.inputs`` order) nested the way ``model``'s call expects."""

    def make_input(self, tensor) -> Any:
        """A new ``Input`` like ``tensor`` (shape, dtype, name, sparse)."""

    def make_model(self, inputs, outputs, name: str | None = None) -> Any:
        """A functional model from ``inputs`` to ``outputs``."""

    def recurrent_call(self, args, kwargs) -> tuple:
        """A recorded recurrent call split into ``(inputs, initial_state, mask, other kwargs)``."""

    def call_traced(self, layer, inputs, initial_state, mask, kwargs) -> Any:
        """Call a traced recurrent layer the way the original call was made."""

    def zeroes_masked_output(self, layer) -> bool:
        """Whether a recurrent layer's own call outputs zeros on masked steps (its
        ``zero_output_for_mask``, where its call honours it), which its traced copy then does too."""

    def stateful_variables(self, layer) -> list:
        """The state variables of a stateful recurrent layer (empty for others)."""

    # --- saving and serialisation -------------------------------------------------------------

    TracedModel: type
    """The traced model's class: functional, registered for saving, its record in its config."""

    def make_traced_model(self, inputs, outputs, name: str) -> Any:
        """A `TracedModel` from ``inputs`` to ``outputs``."""

    def load_model_file(self, path: str, custom_objects: Mapping | None = None, safe_mode: bool = True) -> Any:
        """Load a ``.keras`` / ``.h5`` file with this flavour, not compiled."""

    def registered_object(self, name: str) -> Any:
        """The class or function registered for saving under ``name``, or None."""

    # --- a compiled predict, for capture --------------------------------------------------------

    def compiled_predict(self, model, signature: Sequence[tuple]) -> Callable[[Sequence], list]:
        """``model``'s forward pass compiled once: ``f([input arrays]) -> [NumPy outputs]``.

        ``signature`` holds per input ``(shape with None for open axes, dtype)``.
        """

    # --- dataset handling ---------------------------------------------------------------------

    def is_dataset(self, data) -> bool:
        """Whether ``data`` is a ``tf.data.Dataset`` (False, importing nothing, without TensorFlow)."""

    def dataset_batches(self, dataset, batch_size: int,
                        is_batched: Callable[[Any], bool]) -> tuple[int | None, Callable[[], Iterator]]:
        """A dataset as NumPy batches: ``(number of batches or None, fresh iterator factory)``.

        ``is_batched(element_spec)`` says whether its elements are batches; if not, they are
        batched by ``batch_size``.
        """

    # --- GPU detection ------------------------------------------------------------------------

    def gpu_visible(self) -> bool:
        """Whether this flavour computes on a GPU (for Keras 3: its backend in use)."""


def interface_names() -> tuple[str, ...]:
    """Every name of the `Backend` interface, sorted.

    Example:
        >>> "compiled_predict" in interface_names()
        True
    """
    names = set(getattr(Backend, "__annotations__", {}))
    names |= {n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")}
    return tuple(sorted(names))


def flavour_of(obj) -> str:
    """Return "keras3" or "tfkeras" for a model, layer or Keras tensor of either flavour.

    Example:
        >>> flavour_of(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))
        'keras3'
    """
    for klass in type(obj).__mro__:
        module = klass.__module__ or ""
        if module.startswith("tf_keras"):
            return "tfkeras"
        if module.startswith("keras"):
            return "keras3"
    from ..errors import UnsupportedModelError

    raise UnsupportedModelError(
        f"{type(obj).__name__!r} is neither a Keras 3 nor a tf-keras object. Pass a model built with "
        f"`keras` (Keras 3, also `tf.keras` on TF >= 2.16) or `tf_keras`. Received: {obj!r}"
    )


def get(flavour: str) -> Backend:
    """The backend module for a flavour name ("keras3" or "tfkeras").

    Example:
        >>> get("tfkeras").LSTM.__module__.split(".")[0]
        'tf_keras'
    """
    return importlib.import_module(_MODULES[flavour])


def for_model(model) -> Backend:
    """The backend module that matches the flavour of ``model``.

    Example:
        >>> for_model(model).output_names(model)
        ['next_char']
    """
    return get(flavour_of(model))


def cached_on_model(model, key, make: Callable[[], Any]) -> Any:
    """``make()``, kept on ``model`` under ``key`` for the next call: a compiled forward pass is
    traced (on JAX, compiled) once per model, not once per capture or intervention run."""
    cache = getattr(model, "__dict__", {}).get("_lstm_rewrite_cache")
    if cache is None:
        cache = {}
        try:
            # Past Keras's attribute tracking, which would wrap the dict.
            object.__setattr__(model, "_lstm_rewrite_cache", cache)
        except Exception:  # noqa: BLE001 - a model that refuses new attributes: just do not cache
            return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def keras_module(flavour: str) -> ModuleType:
    """The ``keras`` (Keras 3) or ``tf_keras`` module for a flavour name.

    Example:
        >>> keras_module("keras3").__name__
        'keras'
    """
    return get(flavour).keras


def import_tensorflow(while_loading: Callable[[], ContextManager] = contextlib.nullcontext) -> ModuleType | None:
    """Import TensorFlow (what tf-keras, and Keras 3 on its default backend, run on), or return
    None where it is not installed.

    The CLI calls it before anything else touches a model, so that TensorFlow starts up while the
    CLI can still keep its start-up log off the terminal.

    Args:
        while_loading: a context manager factory entered around the import when TensorFlow is not
            imported yet (the CLI's points stderr at /dev/null).

    Example:
        >>> import_tensorflow().__name__
        'tensorflow'
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if importlib.util.find_spec("tensorflow") is None:
        return None
    with while_loading():
        return importlib.import_module("tensorflow")


def read_tfrecord(path: str) -> Iterator[Mapping[str, Any]]:
    """The features of each serialized ``tf.train.Example`` in a TFRecord file, in file order.

    TensorFlow is imported here, on first use: only TFRecord sources need it. A name ending in
    ``.gz`` is read as GZIP. Each item maps feature name -> ``tf.train.Feature`` (read its
    ``float_list`` / ``int64_list`` / ``bytes_list`` ``.value``).

    Raises:
        DataError: a truncated or corrupt file, or a record that is not a ``tf.train.Example``.

    Example:
        >>> for features in read_tfrecord("data/part-0.tfrecord"):  # doctest: +SKIP
        ...     tokens = list(features["tokens"].int64_list.value)
    """
    from . import _tensorflow

    return _tensorflow.read_tfrecord(path)
