"""The bad-input catalogue (docs/bad_inputs.md): one test per case not already covered elsewhere.

Each case must end in an error from the library's hierarchy that names the layer, input or file and
says what to do, and must leave nothing behind that looks like a result. Cases tested in
test_errors.py, test_loading.py, test_capture.py and test_cli.py are listed in the table, not
repeated here.
"""

from __future__ import annotations

import errno
import json
import os
import zipfile

import h5py
import numpy as np
import pytest
from conftest import Untouched

from lstm_rewrite import (
    DataError,
    InvalidArgumentError,
    LstmRewriteError,
    ModelFileError,
    UnsupportedModelError,
    VerificationError,
    expose_cell_states,
    verify,
)
from lstm_rewrite.capture import cell_states
from lstm_rewrite.cli import main
from lstm_rewrite.loading import load_model

rng = np.random.default_rng(11)
X = rng.standard_normal((2, 5, 4)).astype("float32")


def one_lstm(keras, name="encoder"):
    inputs = keras.Input((None, 4), name="x")
    return keras.Model(inputs, keras.layers.LSTM(3, name=name)(inputs), name="one")


def two_inputs(keras):
    a, b = keras.Input((None, 4), name="a"), keras.Input((None, 2), name="b")
    la, lb = keras.layers.LSTM(3, name="la")(a), keras.layers.LSTM(3, name="lb")(b)
    return keras.Model([a, b], keras.layers.Concatenate(name="both")([la, lb]), name="two")


def with_nan(array, index):
    array = array.copy()
    array[index] = np.nan
    return array


# ---------------------------------------------------------------------------------------------
# expose_cell_states: what is passed as the model and the arguments
# ---------------------------------------------------------------------------------------------


def test_a_file_name_instead_of_a_model(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"not a file name.*load_model\('.*model.keras'\)"):
        expose_cell_states(str(tmp_path / "model.keras"))
    with pytest.raises(InvalidArgumentError, match="load_model"):
        expose_cell_states(tmp_path / "model.keras")


def test_a_layer_instead_of_a_model(flavour):
    with pytest.raises(UnsupportedModelError, match=r"takes a Keras model.*Received: LSTM"):
        expose_cell_states(flavour.layers.LSTM(3))


def test_layers_of_the_wrong_type(flavour):
    model = one_lstm(flavour.keras)
    with pytest.raises(InvalidArgumentError, match=r"layers=.*Received: layers=5 of type int"):
        expose_cell_states(model, layers=5)
    with pytest.raises(InvalidArgumentError, match=r"Received an element 3 of type int"):
        expose_cell_states(model, layers=["encoder", 3])


def test_states_and_layers_that_select_nothing(flavour):
    model = one_lstm(flavour.keras)
    with pytest.raises(InvalidArgumentError, match=r"names nothing to expose"):
        expose_cell_states(model, states=())
    with pytest.raises(InvalidArgumentError, match=r"selects none.*'encoder'"):
        expose_cell_states(model, layers=[])


# ---------------------------------------------------------------------------------------------
# expose_cell_states(..., sample_inputs=...) and verify(..., inputs): validated before running
# ---------------------------------------------------------------------------------------------

SAMPLE_CASES = {
    # case: (model builder, sample_inputs, message)
    "wrong feature size": (one_lstm, np.zeros((2, 5, 3), "float32"), r"'x' .*size 3 on axis 2; the model expects 4"),
    "missing time axis": (one_lstm, np.zeros((2, 5), "float32"), r"'x' .*2 dimension\(s\); the model expects 3"),
    "strings": (one_lstm, np.array([["a", "b"]]), r"'x' .*dtype <U1.*expects numbers"),
    "a file name": (one_lstm, "inputs.npy", r"'x' .*is a file name.*np\.load\(path\)"),
    "NaN": (one_lstm, with_nan(X, (1, 2, 0)), r"'x' .*NaN or Inf \(first at index \(1, 2, 0\)\)"),
    "Inf": (one_lstm, np.full((2, 5, 4), np.inf, "float32"), r"'x' .*NaN or Inf"),
    "empty batch": (one_lstm, np.zeros((0, 5, 4), "float32"), r"'x' .*is empty"),
    "no time steps": (one_lstm, np.zeros((2, 0, 4), "float32"), r"'x' .*is empty"),
    "one array for two inputs": (two_inputs, X, r"takes 2 inputs \('a' .*'b' .*single array"),
    "three arrays for two inputs": (two_inputs, [X, X[..., :2], X[..., :2]], r"takes 2 input.*holds 3 array"),
    "batch sizes differ": (two_inputs, [X, np.zeros((3, 5, 2), "float32")], r"different numbers of sequences"),
    "unknown dict key": (two_inputs, {"a": X, "c": X[..., :2]}, r"missing \['b'\], unknown \['c'\]"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_bad_sample_inputs(flavour, case):
    build, data, message = SAMPLE_CASES[case]
    model = build(flavour.keras)
    good = [X, X[..., :2]] if build is two_inputs else X
    guard = Untouched(model, good)
    with pytest.raises(DataError, match=message) as info:
        expose_cell_states(model, sample_inputs=data)
    assert isinstance(info.value, ValueError) and "sample_inputs" in str(info.value)
    assert "\x1b[" not in str(info.value) and "Traceback" not in str(info.value)
    guard.check()


def test_sample_inputs_of_the_wrong_batch_for_a_stateful_model(flavour):
    keras = flavour.keras
    inputs = keras.Input(batch_shape=(2, 5, 4), name="x")
    model = keras.Model(inputs, keras.layers.LSTM(3, stateful=True, name="stateful")(inputs), name="streaming")
    with pytest.raises(DataError, match=r"'streaming' is built for batches of exactly 2 sequences.*holds 3"):
        expose_cell_states(model, sample_inputs=np.zeros((3, 5, 4), "float32"))


def test_verify_refuses_nan_inputs_that_would_make_it_vacuous(flavour):
    """NaN in, NaN out on both sides: without the check, verification would pass on anything."""
    model = one_lstm(flavour.keras)
    traced = expose_cell_states(model, sample_inputs=X)
    with pytest.raises(DataError, match=r"'x' .*NaN or Inf"):
        verify(model, traced, with_nan(X, (0, 0, 0)))


def test_verify_with_a_traced_model_that_cannot_run_the_inputs(flavour):
    """verify(model, traced) where the traced model is not the model's: it fails where the model runs."""
    keras = flavour.keras
    model = one_lstm(keras)
    inputs = keras.Input((None, 3), name="x")
    other = keras.Model(inputs, keras.layers.LSTM(3, name="encoder")(inputs), name="other")
    with pytest.raises(VerificationError, match=r"traced model of 'one' fails on inputs the original model accepts"):
        verify(model, expose_cell_states(other), X)


# ---------------------------------------------------------------------------------------------
# cell_states: data the capture cannot use (the rest is in test_capture.py)
# ---------------------------------------------------------------------------------------------


def test_cell_states_given_a_file_name_as_data(flavour, tmp_path):
    model = one_lstm(flavour.keras)
    for name in (str(tmp_path / "x.npy"), tmp_path / "x.npy"):
        with pytest.raises(DataError, match=r"'x' passed as data is a file name.*np\.load\(path\)"):
            cell_states(model, name, out=tmp_path / "s.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cell_states_with_an_unknown_state(flavour, tmp_path):
    model = one_lstm(flavour.keras)
    with pytest.raises(InvalidArgumentError, match=r"Unknown state 'cell'.*'gates'"):
        cell_states(model, X, states=("cell",), out=tmp_path / "s.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


def _fill_disk_after(monkeypatch, writes: int) -> list:
    """Make h5py's dataset writes fail with ENOSPC after ``writes`` successful ones."""
    done = []
    original = h5py.Dataset.__setitem__

    def write(self, key, value):
        if len(done) >= writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        done.append(key)
        original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", write)
    return done


def test_disk_full_inside_the_hdf5_writer(flavour, tmp_path, monkeypatch):
    """ENOSPC from h5py itself, in the middle of the second batch: no file, partial or whole, is left."""
    model = one_lstm(flavour.keras)
    data = rng.standard_normal((6, 5, 4)).astype("float32")
    done = _fill_disk_after(monkeypatch, writes=3)
    with pytest.raises(OSError) as info:
        cell_states(model, data, states=("c", "h"), batch_size=2, out=tmp_path / "states.h5", progress=False)
    assert info.value.errno == errno.ENOSPC and len(done) == 3
    assert "states.h5" in str(info.value) and "No space left" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Model files (the rest is in test_loading.py)
# ---------------------------------------------------------------------------------------------


def test_a_zip_archive_that_is_not_a_model(tmp_path):
    path = tmp_path / "photos.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cat.jpg", b"\xff\xd8\xff")
    with pytest.raises(ModelFileError, match=r"photos.keras.*not a Keras model file.*no config.json"):
        load_model(path)


def test_a_keras_archive_whose_config_is_not_json(tmp_path):
    path = tmp_path / "broken.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{not json")
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
    with pytest.raises(ModelFileError, match=r"broken.keras.*not valid JSON.*corrupt"):
        load_model(path)


def test_an_h5_whose_model_config_is_not_json(tmp_path):
    path = tmp_path / "broken.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = "{not json"
        handle.attrs["keras_version"] = "2.21.0"
    with pytest.raises(ModelFileError, match=r"broken.h5.*not valid JSON.*corrupt"):
        load_model(path)


def test_a_model_file_that_keras_cannot_rebuild(tmp_path):
    """A well-formed archive whose config names a class Keras does not know."""
    path = tmp_path / "odd.keras"
    config = {"class_name": "NoSuchModel", "config": {"name": "odd"}, "module": "keras.src.models"}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
    with pytest.raises(ModelFileError, match=r"odd.keras.*could not be loaded.*To fix:"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    import keras

    root = tmp_path_factory.mktemp("bad_cli")
    keras.utils.set_random_seed(3)
    one_lstm(keras).save(root / "one.keras")
    inputs = keras.Input((4,), name="features")
    keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs), name="mlp").save(root / "mlp.keras")
    data = root / "good.npy"
    np.save(data, X)
    return root


def cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err


def assert_one_error_line(code, err, message):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert message in lines[0], (message, err)


CLI_CASES = {
    # case: (command line after the model's path, what to write first, message)
    "truncated model file": ("truncated", r"truncated or corrupt"),
    "text file as model": ("text", r"neither a zip archive"),
    "model without an LSTM": ("mlp", r"has no LSTM"),
    "NaN in the data": ("nan", r"NaN or Inf"),
    "data of the wrong shape": ("shape", r"size 3 on axis 2; the model expects 4"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reports_bad_input_in_one_line(case, model_files, tmp_path, capsys):
    kind, message = CLI_CASES[case]
    model, data = model_files / "one.keras", model_files / "good.npy"
    if kind == "truncated":
        model = tmp_path / "cut.keras"
        full = (model_files / "one.keras").read_bytes()
        model.write_bytes(full[: len(full) // 3])
    elif kind == "text":
        model = tmp_path / "notes.keras"
        model.write_text("not a model")
    elif kind == "mlp":
        model = model_files / "mlp.keras"
    elif kind == "nan":
        data = tmp_path / "nan.npy"
        np.save(data, with_nan(X, (1, 1, 1)))
    elif kind == "shape":
        data = tmp_path / "narrow.npy"
        np.save(data, X[..., :3])
    before = set(os.listdir(tmp_path))
    command = ["states", model, "--data", data, "-o", tmp_path / "states.h5", "--quiet"]
    if kind in ("truncated", "text", "mlp"):
        command = ["expose", model, "-o", tmp_path / "traced.keras"]
    code, err = cli(command, capsys)
    assert_one_error_line(code, err, message)
    assert set(os.listdir(tmp_path)) == before


def test_cli_disk_full_while_writing_states(model_files, tmp_path, capsys, monkeypatch):
    data = tmp_path / "many.npy"
    np.save(data, rng.standard_normal((6, 5, 4)).astype("float32"))
    before = set(os.listdir(tmp_path))
    _fill_disk_after(monkeypatch, writes=2)
    code, err = cli(["states", model_files / "one.keras", "--data", data, "-o", tmp_path / "states.h5",
                     "--batch-size", "2", "--quiet"], capsys)
    assert_one_error_line(code, err, "No space left on device")
    assert set(os.listdir(tmp_path)) == before


def test_every_catalogued_error_is_a_library_error():
    """The hierarchy the catalogue relies on: one root, ValueError for bad caller input."""
    assert issubclass(DataError, LstmRewriteError) and issubclass(DataError, ValueError)
    assert issubclass(InvalidArgumentError, LstmRewriteError) and issubclass(InvalidArgumentError, ValueError)
    assert issubclass(ModelFileError, LstmRewriteError) and issubclass(UnsupportedModelError, LstmRewriteError)
