"""Model files: flavour detection from the file's own metadata, refusal of embedded code, clear errors."""

from __future__ import annotations

import importlib
import json
import shutil

import h5py
import numpy as np
import pytest

from lstm_rewrite.backends import flavour_of
from lstm_rewrite.errors import ModelFileError, UnsafeModelError
from lstm_rewrite.loading import find_unsafe_layers, inspect_model_file, load_model

FLAVOURS = ("keras3", "tfkeras")


@pytest.fixture(params=FLAVOURS)
def flavour(request) -> str:
    return request.param


def kmod(flavour: str):
    return importlib.import_module("keras" if flavour == "keras3" else "tf_keras")


def small_model(flavour: str):
    k = kmod(flavour)
    k.utils.set_random_seed(0)
    x = k.Input((4, 3), name="x")
    y = k.layers.LSTM(5, return_sequences=True, name="encoder")(x)
    return k.Model(x, k.layers.Dense(2, name="head")(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One .keras and one .h5 file per flavour, saved once for the module."""
    root = tmp_path_factory.mktemp("models")
    files = {}
    for fl in FLAVOURS:
        model = small_model(fl)
        for fmt in ("keras", "h5"):
            path = root / f"{fl}.{fmt}"
            model.save(path)
            files[fl, fmt] = (path, model)
    return files


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_loads_with_the_flavour_that_wrote_the_file(flavour, fmt, saved):
    path, original = saved[flavour, fmt]
    info = inspect_model_file(path)
    assert (info.format, info.flavour) == (fmt, flavour)
    assert info.keras_version.startswith("3." if flavour == "keras3" else "2.")
    model = load_model(path)
    assert flavour_of(model) == flavour
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    np.testing.assert_allclose(model(x), original(x), atol=1e-6)


def test_flavour_from_input_shapes_when_no_version_is_recorded(flavour, saved, tmp_path):
    path = tmp_path / "anonymous.h5"
    shutil.copy(saved[flavour, "h5"][0], path)
    with h5py.File(path, "a") as handle:
        del handle.attrs["keras_version"]
    info = inspect_model_file(path)
    assert info.flavour == flavour and info.keras_version is None
    assert any("batch_shape" in e or "batch_input_shape" in e for e in info.evidence)
    assert flavour_of(load_model(path)) == flavour


def test_content_decides_not_the_file_name(flavour, saved, tmp_path):
    for fmt in ("keras", "h5"):
        path = tmp_path / f"model_{fmt}.bin"
        shutil.copy(saved[flavour, fmt][0], path)
        assert inspect_model_file(path).format == fmt
        assert flavour_of(load_model(path)) == flavour


# ---------------------------------------------------------------------------------------------
# Embedded code
# ---------------------------------------------------------------------------------------------


def hostile_model(flavour: str, marker: str, nested: bool = False):
    """A model whose Lambda writes ``marker`` whenever it runs, e.g. when tf-keras loads an .h5."""
    k = kmod(flavour)

    def evil(t):
        return (open(marker, "w").write("ran"), t)[1]

    x = k.Input((4, 3), name="x")
    if nested:
        body = k.Sequential([k.Input((4, 3)), k.layers.TimeDistributed(k.layers.Lambda(
            lambda t: (open(marker, "w").write("ran"), t)[1], name="evil"), name="td")], name="body")
        y = body(x)
    else:
        y = k.layers.Lambda(lambda t: (open(marker, "w").write("ran"), t)[1], name="evil")(x)
    del evil
    y = k.layers.LSTM(2, name="encoder")(y)
    return k.Model(x, y)


def test_hostile_h5_is_refused_and_its_code_never_runs(tmp_path):
    import tf_keras

    marker = tmp_path / "marker"
    path = tmp_path / "hostile.h5"
    hostile_model("tfkeras", str(marker)).save(path)
    marker.unlink()  # building the model ran the lambda once
    with pytest.raises(UnsafeModelError, match=r"'evil' \(Lambda\).*safe=False.*--unsafe"):
        load_model(path)
    assert not marker.exists()
    # The file is really hostile: tf-keras runs the code on load despite safe_mode=True.
    tf_keras.models.load_model(path, safe_mode=True, compile=False)
    assert marker.exists()


def test_unsafe_loads_only_when_trusted(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.h5"
    hostile_model("tfkeras", str(marker)).save(path)
    marker.unlink()
    model = load_model(path, safe=False)
    assert flavour_of(model) == "tfkeras"
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_code_is_found_in_nested_models_and_wrappers(flavour, fmt, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / f"nested.{fmt}"
    hostile_model(flavour, str(marker), nested=True).save(path)
    marker.unlink(missing_ok=True)
    assert find_unsafe_layers(inspect_model_file(path).config) == [("body.td.evil", "Lambda")]
    with pytest.raises(UnsafeModelError, match="body.td.evil"):
        load_model(path)
    assert not marker.exists()


def test_named_functions_carry_no_code():
    keras3_named = {"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "Lambda", "config": {"name": "sq", "function": {
            "module": "builtins", "class_name": "function", "config": "square", "registered_name": "function"}}},
        {"class_name": "Dense", "config": {"name": "d", "activation": "relu"}}]}}
    assert find_unsafe_layers(keras3_named) == []
    keras3_lambda_activation = json.loads(json.dumps(keras3_named))
    keras3_lambda_activation["config"]["layers"][1]["config"]["activation"] = {
        "class_name": "__lambda__", "config": {"code": "AAAA"}}
    assert find_unsafe_layers(keras3_lambda_activation) == [("d", "Dense")]


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


def test_missing_directory_and_foreign_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.keras")
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelFileError, match="notes.txt.*neither a zip archive"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        load_model(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "data.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(ModelFileError, match="data.h5.*no model_config"):
        load_model(tmp_path / "data.h5")


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_truncated_and_corrupt_files(flavour, fmt, saved, tmp_path):
    data = saved[flavour, fmt][0].read_bytes()
    truncated = tmp_path / f"truncated.{fmt}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated.*corrupt"):
        load_model(truncated)
    if fmt == "keras":
        # Flip bytes inside the stored weights: the archive's checksums catch it.
        corrupt = bytearray(data)
        start = data.find(b"model.weights.h5") + 200
        corrupt[start:start + 64] = bytes(b ^ 0xFF for b in corrupt[start:start + 64])
        (tmp_path / "corrupt.keras").write_bytes(bytes(corrupt))
        with pytest.raises(ModelFileError, match="corrupt"):
            load_model(tmp_path / "corrupt.keras")


def test_weights_only_file(flavour, saved, tmp_path):
    path = tmp_path / "only.weights.h5"
    saved[flavour, "h5"][1].save_weights(path)
    with pytest.raises(ModelFileError, match="weights only.*load_weights"):
        load_model(path)


def test_unknown_custom_layer_says_what_to_do(flavour, tmp_path):
    k = kmod(flavour)

    @k.saving.register_keras_serializable(package="test_loading")
    class Twice(k.layers.Layer):
        def call(self, x):
            return 2 * x

    x = k.Input((4, 3))
    model = k.Model(x, k.layers.LSTM(2)(Twice(name="twice")(x)))
    path = tmp_path / "custom.keras"
    model.save(path)
    k.saving.get_custom_objects().pop("test_loading>Twice")
    with pytest.raises(ModelFileError, match="custom.keras.*test_loading>Twice.*custom_objects"):
        load_model(path)
    assert flavour_of(load_model(path, custom_objects={"test_loading>Twice": Twice})) == flavour
