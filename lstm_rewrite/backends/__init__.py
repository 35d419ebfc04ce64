"""Backends: the only modules that import keras or tf_keras, one per flavour.

Keras 3 and tf-keras spell the same functional graph differently; each backend module hides that
behind the same small set of names, so the rewrite pass never asks which flavour it is working on.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

FLAVOURS = ("keras3", "tfkeras")
_MODULES = {"keras3": "lstm_rewrite.backends.keras3", "tfkeras": "lstm_rewrite.backends.tfkeras"}


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


def get(flavour: str) -> ModuleType:
    """The backend module for a flavour name ("keras3" or "tfkeras")."""
    return importlib.import_module(_MODULES[flavour])


def for_model(model) -> ModuleType:
    """The backend module that matches the flavour of ``model``."""
    return get(flavour_of(model))


def keras_module(flavour: str) -> ModuleType:
    """The ``keras`` (Keras 3) or ``tf_keras`` module for a flavour name."""
    return get(flavour).keras


def import_tensorflow() -> ModuleType | None:
    """Import TensorFlow (what tf-keras, and Keras 3 on its default backend, run on), or return
    None where it is not installed.

    The CLI calls it before anything else touches a model, so that TensorFlow starts up while the
    CLI can still keep its start-up log off the terminal.

    Example:
        >>> import_tensorflow().__name__
        'tensorflow'
    """
    if importlib.util.find_spec("tensorflow") is None:
        return None
    return importlib.import_module("tensorflow")
