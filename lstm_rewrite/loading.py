"""Model-file stage: identify which Keras wrote a model file, refuse embedded Python code, and load it.

A ``.keras`` archive records its writer in ``metadata.json`` (``keras_version``); a legacy ``.h5``
file in its root attributes ``keras_version`` and ``backend``, and Keras 3 configs spell input
shapes ``batch_shape`` where tf-keras writes ``batch_input_shape``. The file is loaded with the
flavour that wrote it: ``keras`` for 3.x, ``tf_keras`` for 2.x.

tf-keras runs the Python bytecode of a ``Lambda`` layer when it loads a legacy ``.h5`` file, even
with ``safe_mode=True``. So the model config is read with h5py / zipfile first and any layer
carrying serialized code is refused before Keras sees the file, unless the caller says the file is
trusted (``safe=False``, ``--unsafe`` on the command line).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import backends
from .errors import ModelFileError, UnsafeModelError

__all__ = ["ModelFileInfo", "inspect_model_file", "find_unsafe_layers", "load_model"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"


@dataclass
class ModelFileInfo:
    """What a model file says about itself, read without running any of it.

    Attributes:
        path: the file.
        format: ``"keras"`` (zip archive) or ``"h5"`` (legacy HDF5).
        flavour: ``"keras3"`` or ``"tfkeras"``: the Keras that wrote the file.
        keras_version: the writer's version string, or ``None`` when the file does not record it.
        backend: the writer's backend (``.h5`` only), or ``None``.
        config: the model config (``{"class_name": ..., "config": ...}``).
        evidence: why ``flavour`` was chosen, for messages and ``lstm-rewrite inspect``.
    """

    path: str
    format: str
    flavour: str
    keras_version: str | None
    backend: str | None
    config: dict
    evidence: list[str] = field(default_factory=list)


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _walk(node) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _walk(value)


def _shape_keys(config: dict) -> set[str]:
    keys = set()
    for node in _walk(config):
        if isinstance(node, dict):
            keys.update(k for k in ("batch_shape", "batch_input_shape") if k in node)
    return keys


def _flavour_from(version: str | None, config: dict, module_hint: str | None) -> tuple[str | None, list[str]]:
    evidence = []
    if version:
        major = version.strip().split(".")[0]
        if major == "3":
            return "keras3", [f"keras_version {version}"]
        if major == "2":
            return "tfkeras", [f"keras_version {version}"]
        evidence.append(f"unrecognised keras_version {version!r}")
    if module_hint:
        if module_hint.startswith("tf_keras"):
            return "tfkeras", evidence + [f"config module {module_hint}"]
        if module_hint.startswith("keras.src"):
            return "keras3", evidence + [f"config module {module_hint}"]
    keys = _shape_keys(config)
    if keys == {"batch_shape"}:
        return "keras3", evidence + ["input layers use batch_shape"]
    if keys == {"batch_input_shape"}:
        return "tfkeras", evidence + ["input layers use batch_input_shape"]
    return None, evidence


def _not_a_model(path: str, what: str) -> ModelFileError:
    return ModelFileError(
        f"{path!r} is not a Keras model file: {what}. Pass a model saved with `model.save(...)` as "
        f".keras (Keras 3 or tf-keras) or .h5. Received: {path!r}"
    )


def _read_keras_archive(path: str) -> ModelFileInfo:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                raise _not_a_model(path, "the zip archive has no config.json")
            bad = archive.testzip()
            if bad is not None:
                raise ModelFileError(
                    f"{path!r} is corrupt: the member {bad!r} fails its checksum. Save the model again "
                    f"or copy the file again. Received: {path!r}"
                )
            config = json.loads(archive.read("config.json"))
            metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as exc:
        raise ModelFileError(
            f"{path!r} looks like a .keras archive but cannot be read ({exc}); it is probably truncated "
            f"or corrupt. Save the model again or copy the file again. Received: {path!r}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(
            f"{path!r}: the model config in the archive is not valid JSON ({exc}); the file is corrupt. "
            f"Save the model again. Received: {path!r}"
        ) from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise _not_a_model(path, "config.json holds no model config")
    version = _text(metadata.get("keras_version"))
    flavour, evidence = _flavour_from(version, config, _text(config.get("module")))
    return ModelFileInfo(path, "keras", flavour or "keras3", version, None, config,
                         evidence or ["no version recorded; assumed Keras 3"])


def _read_h5(path: str) -> ModelFileInfo:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            attrs = {k: handle.attrs[k] for k in ("keras_version", "backend", "model_config")
                     if k in handle.attrs}
            # Legacy weights files list "layer_names"; Keras 3 / tf-keras ".weights.h5" files hold
            # "layers" and "vars" groups.
            has_weights = ("model_weights" in handle or "layer_names" in handle.attrs
                           or ("layers" in handle and "vars" in handle))
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path!r} looks like an HDF5 file but cannot be read ({exc}); it is probably truncated or "
            f"corrupt. Save the model again or copy the file again. Received: {path!r}"
        ) from None
    if "model_config" not in attrs:
        what = ("it holds weights only, without the model's config; build the model in code and call "
                "`model.load_weights(...)`, or save the whole model") if has_weights else (
                "it has no model_config attribute")
        raise _not_a_model(path, what)
    try:
        config = json.loads(_text(attrs["model_config"]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelFileError(
            f"{path!r}: the model_config attribute is not valid JSON ({exc}); the file is corrupt. Save "
            f"the model again. Received: {path!r}"
        ) from None
    version = _text(attrs.get("keras_version"))
    flavour, evidence = _flavour_from(version, config, None)
    return ModelFileInfo(path, "h5", flavour or "tfkeras", version, _text(attrs.get("backend")), config,
                         evidence or ["no version recorded; assumed tf-keras (Keras 2 legacy .h5)"])


def _check_path(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"Model file {path!r} does not exist. Check the path. Received: {path!r}")
    if os.path.isdir(path):
        raise ModelFileError(
            f"{path!r} is a directory (a TensorFlow SavedModel?), not a model file. Load it where it "
            f"was made and save it as .keras or .h5 (`model.save('model.keras')`). Received: {path!r}"
        )
    return path


def inspect_model_file(path: str | os.PathLike) -> ModelFileInfo:
    """Read a model file's format, writer and config without loading it.

    Args:
        path: a ``.keras`` archive or a legacy ``.h5`` file (recognised by content, not by name).

    Returns:
        ModelFileInfo: format, flavour (``"keras3"``/``"tfkeras"``), version and config.

    Raises:
        ModelFileError: missing path, a directory, not a model, truncated or corrupt.

    Example:
        >>> inspect_model_file("model.h5").flavour
        'tfkeras'
    """
    path = _check_path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise ModelFileError(f"Cannot read model file {path!r} ({exc}). Check its permissions.") from None
    if head.startswith(_ZIP_SIGNATURE):
        return _read_keras_archive(path)
    if head == _HDF5_SIGNATURE:
        return _read_h5(path)
    if not head:
        raise _not_a_model(path, "the file is empty")
    raise _not_a_model(path, "it is neither a zip archive (.keras) nor an HDF5 file (.h5)")


# Where a layer config keeps the configs of the layers it contains (models, wrappers).
_CHILD_KEYS = ("layers", "layer", "backward_layer", "forward_layer")


def _carries_code(config) -> bool:
    for node in _walk(config):
        if isinstance(node, dict):
            # Keras 3 serialises a Python lambda as {"class_name": "__lambda__", "config": {"code": ...}};
            # tf-keras serialises every Lambda function (named or not) as marshalled bytecode with
            # function_type "lambda" (and the same for output_shape / mask).
            if node.get("class_name") == "__lambda__":
                return True
            if any(node.get(key) == "lambda" for key in ("function_type", "output_shape_type", "mask_type")):
                return True
    return False


def find_unsafe_layers(config: dict) -> list[tuple[str, str]]:
    """List the layers of a model config that carry serialized Python code.

    Walks nested models (Sequential, Functional) and wrappers (Bidirectional, TimeDistributed).

    Args:
        config: a model config as stored in the file (``{"class_name": ..., "config": ...}``).

    Returns:
        list of ``(dotted layer path, class name)``, e.g. ``[("body.double", "Lambda")]``.

    Example:
        >>> find_unsafe_layers(inspect_model_file("model.h5").config)
        [('double', 'Lambda')]
    """
    found: list[tuple[str, str]] = []

    def visit(node, prefix: str) -> None:
        if isinstance(node, dict):
            cfg = node.get("config")
            if "class_name" in node and isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
                here = f"{prefix}.{cfg['name']}" if prefix else cfg["name"]
                own = {k: v for k, v in cfg.items() if k not in _CHILD_KEYS}
                if _carries_code(own):
                    found.append((here, str(node["class_name"])))
                for key in _CHILD_KEYS:
                    if key in cfg:
                        visit(cfg[key], here)
                return
            for value in node.values():
                visit(value, prefix)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value, prefix)

    # The top-level model's own name is not part of the layer paths.
    top = config.get("config") if isinstance(config, dict) else None
    if isinstance(top, dict) and any(k in top for k in _CHILD_KEYS):
        if _carries_code({k: v for k, v in top.items() if k not in _CHILD_KEYS}):
            found.append((str(top.get("name", "?")), str(config.get("class_name"))))
        for key in _CHILD_KEYS:
            if key in top:
                visit(top[key], "")
    else:
        visit(config, "")
    return found


_BUILTIN_MODULES = ("keras", "tf_keras", "builtins")


def _custom_classes(config) -> list[str]:
    """Registered names of the classes a config needs that neither Keras defines."""
    found = []
    for node in _walk(config):
        if not isinstance(node, dict) or "class_name" not in node:
            continue
        registered = node.get("registered_name")
        module = node.get("module")
        name = str(registered or node["class_name"])
        if (">" in name or (isinstance(module, str) and not module.startswith(_BUILTIN_MODULES))) \
                and name not in found and name != "function":
            found.append(name)
    return found


def load_model(path: str | os.PathLike, *, safe: bool = True, custom_objects: dict | None = None):
    """Load a ``.keras`` or ``.h5`` model with the Keras flavour that wrote it, refusing embedded code.

    Args:
        path: the model file. Its content decides the format; Keras 3.x files load with ``keras``,
            2.x files with ``tf_keras``.
        safe: refuse layers carrying serialized Python code (``Lambda``). Pass ``False`` only for
            files you trust: loading them runs that code.
        custom_objects: custom layers, functions and classes, by name, as for Keras's ``load_model``.

    Returns:
        The model (Keras 3 or tf-keras), not compiled. A traced model comes back with its
        ``rewrite_record`` (stored in the file; for files of release 0.1.0, recovered from its
        outputs), so every later stage takes it as traced.

    Raises:
        ModelFileError: missing path, a directory, not a model, truncated/corrupt, or Keras cannot
            rebuild it.
        UnsafeModelError: the file carries Python code and ``safe`` is true.

    Example:
        >>> model = load_model("model.h5")
        >>> model = load_model("trusted_with_lambda.h5", safe=False)
    """
    info = inspect_model_file(path)
    path = info.path
    if safe:
        unsafe = find_unsafe_layers(info.config)
        if unsafe:
            names = ", ".join(f"{name!r} ({cls})" for name, cls in unsafe)
            raise UnsafeModelError(
                f"{path!r} contains layer(s) carrying serialized Python code: {names}. Loading would run "
                f"that code. If you trust this file, allow it with safe=False (API) or --unsafe (command "
                f"line); otherwise rebuild the model in code and load only its weights. "
                f"Received: {path!r}"
            )
    backend = backends.get(info.flavour)
    suffix = ".keras" if info.format == "keras" else ".h5"
    tmpdir = None
    load_path = path
    if not path.lower().endswith((suffix, ".hdf5") if suffix == ".h5" else (suffix,)):
        # Keras picks the loader from the file name; give it a name that matches the content.
        tmpdir = tempfile.mkdtemp(prefix="lstm_rewrite_load_")
        load_path = os.path.join(tmpdir, "model" + suffix)
        try:
            os.symlink(os.path.abspath(path), load_path)
        except OSError:
            shutil.copyfile(path, load_path)
    try:
        model = backend.load_model_file(load_path, custom_objects=custom_objects, safe_mode=safe)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        custom = [c for c in _custom_classes(info.config)
                  if c not in (custom_objects or {}) and backend.registered_object(c) is None]
        if custom:
            hint = (f"the model uses custom classes {custom}: import the code that defines them, or pass "
                    f"them with custom_objects={{name: class}}")
        elif "custom_objects" in str(exc) or "Unknown" in str(exc):
            hint = "pass the custom classes or functions it names with custom_objects"
        else:
            hint = "check that the file is complete and was written by Keras"
        raise ModelFileError(
            f"{path!r} ({info.format}, written by {info.flavour} {info.keras_version or '?'}) could not be "
            f"loaded: {type(exc).__name__}: {message[:300]}. To fix: {hint}. Received: {path!r}"
        ) from exc
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if getattr(model, "rewrite_record", None) is None:
        # A traced model saved before records were stored (0.1.0): give it the record its outputs
        # and traced layers tell (None for a model that is not traced).
        from .rewrite.record import recover_record

        recovered = recover_record(model)
        if recovered is not None:
            model.rewrite_record = recovered
    return model
