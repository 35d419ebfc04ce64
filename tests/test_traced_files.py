"""A traced model saved and loaded back is still a traced model: its record is saved with it.

The chain a user follows: expose -> save -> load -> cell_states / audit / export_lstmvis, in
Python and on the command line. Every value read through a reloaded traced model must equal the
fresh traced model's, and the states the NumPy reference's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import reference_lstm

import lstm_rewrite  # noqa: F401  (registers the traced layers for deserialization)
from lstm_rewrite import (
    InvalidArgumentError,
    audit,
    cell_states,
    expose_cell_states,
    export_lstmvis,
    load_model,
)
from lstm_rewrite.cli import main

VOCAB = 9
SAVED_BY_0_1_0 = Path(__file__).parent / "data" / "saved_by_0_1_0"


def tagger(keras):
    layers = keras.layers
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedded = layers.Embedding(VOCAB, 4, mask_zero=True, name="embedding")(tokens)
    seq = layers.LSTM(5, return_sequences=True, name="encoder")(embedded)
    bi = layers.Bidirectional(layers.GRU(3, return_sequences=True), name="bi")(seq)
    return keras.Model(tokens, layers.Dense(2, name="tags")(bi), name="tagger")


def ids():
    x = np.random.default_rng(3).integers(1, VOCAB, size=(6, 7)).astype("int32")
    x[1, 5:] = 0
    x[2, 3:] = 0
    x[4, 6:] = 0
    return x


def depth_of(x):
    return np.cumsum(x % 2, axis=1).astype("float64")


def formats(flavour):
    """.keras in both flavours; legacy .h5 in tf-keras (Keras 3's .h5 cannot store Embedding masks)."""
    return [".keras"] + ([".h5"] if flavour.name == "tfkeras" else [])


@pytest.fixture(scope="module")
def saved_by_flavour():
    """``saved``'s value per flavour, built once for the module: tracing and saving take seconds, and
    the tests that take ``saved`` only read the models and files."""
    return {}


@pytest.fixture
def saved(flavour, saved_by_flavour, tmp_path_factory):
    """(original, fresh traced model, {suffix: path of the saved traced model}, x)."""
    if flavour.name not in saved_by_flavour:
        model = tagger(flavour.keras)
        traced = expose_cell_states(model, states=("c", "h", "gates"), expose_masks=True)
        directory = tmp_path_factory.mktemp(f"saved_{flavour.name}")
        paths = {}
        for suffix in formats(flavour):
            paths[suffix] = str(directory / f"traced{suffix}")
            traced.save(paths[suffix])
        saved_by_flavour[flavour.name] = (model, traced, paths)
    return (*saved_by_flavour[flavour.name], ids())


def test_the_record_is_saved_with_the_model(saved, flavour):
    _, traced, paths, _ = saved
    for suffix, path in paths.items():
        for loader in (flavour.keras.models.load_model, load_model):
            reloaded = loader(path)
            record = reloaded.rewrite_record
            assert record is not None, f"{suffix} via {loader.__module__}: no rewrite_record after loading"
            assert record == traced.rewrite_record, suffix
            assert record.source == "stored"
            assert record.method == "trace" and record.verification.ok
            assert [o.name for o in record.verification.outputs] == ["tags"]
            assert list(reloaded.output_names) == list(traced.output_names)


def test_cell_states_of_a_reloaded_traced_model(saved, flavour):
    model, traced, paths, x = saved
    fresh = cell_states(traced, x, states=None, progress=False)
    assert "bi.backward.z" in list(fresh)  # every exposed state, when states=None on a traced model
    embedded = np.asarray(model.get_layer("embedding")(x))
    want_c = reference_lstm(model.get_layer("encoder"), embedded, flavour.name, mask=x != 0)["c"]
    for suffix, path in paths.items():
        reloaded = cell_states(load_model(path), x, states=None, progress=False)
        assert list(reloaded) == list(fresh), suffix
        for name in fresh:
            np.testing.assert_array_equal(reloaded[name], fresh[name], err_msg=f"{suffix} {name}")
        for layer in ("encoder", "bi.forward", "bi.backward"):
            np.testing.assert_array_equal(reloaded.masks[layer], fresh.masks[layer])
            np.testing.assert_array_equal(reloaded.lengths[layer], (x != 0).sum(axis=1))
        # Against the reference, not only against the library itself.
        np.testing.assert_allclose(reloaded["encoder.c"], want_c, atol=1e-5, rtol=1e-4)
        # A selection of what the file exposes works as on the fresh model.
        only = cell_states(load_model(path), x, states=("c",), layers=["encoder"], progress=False)
        assert list(only) == ["encoder.c"]


def test_audit_and_lstmvis_of_a_reloaded_traced_model(saved, flavour, tmp_path):
    _, traced, paths, x = saved
    labels = {"depth": depth_of(x)}
    fresh = audit(traced, x, labels=labels, progress=False).to_dict()
    for suffix, path in paths.items():
        reloaded = load_model(path)
        report = audit(reloaded, x, labels=labels, progress=False).to_dict()
        assert report == fresh, suffix
        states = cell_states(reloaded, x, states=("c", "h"), progress=False)
        project = export_lstmvis(states, tmp_path / f"lstmvis{suffix}", tokens=x,
                                 vocab={i: f"w{i}" for i in range(VOCAB)})
        assert os.path.exists(project)


def test_tracing_a_traced_model_says_it_is_traced(saved):
    _, traced, paths, _ = saved
    for model in [traced] + [load_model(p) for p in paths.values()]:
        with pytest.raises(InvalidArgumentError, match="'tagger' is already traced.*trace the original model"):
            expose_cell_states(model)


# ---------------------------------------------------------------------------------------------
# The command line: expose, then inspect / states / audit on the traced file
# ---------------------------------------------------------------------------------------------


@pytest.mark.backend_independent(
    reason="the command line over a traced file; the Python chain above (save, load, cell_states, audit) runs "
           "on this backend")
def test_cli_chain_on_a_traced_file(flavour, tmp_path, capsys):
    model = tagger(flavour.keras)
    x = ids()
    model_path, data_path = str(tmp_path / "model.keras"), str(tmp_path / "x.npy")
    model.save(model_path)
    np.save(data_path, x)
    np.save(tmp_path / "depth.npy", depth_of(x))
    expected = cell_states(model, x, states=("c", "h"), progress=False)
    for suffix in formats(flavour):
        traced_path = str(tmp_path / f"traced{suffix}")
        assert main(["expose", model_path, "-o", traced_path, "--states", "c,h", "--masks"]) == 0
        capsys.readouterr()

        assert main(["inspect", traced_path]) == 0
        shown = capsys.readouterr().out
        assert "traced model 'tagger', by its stored rewrite record" in shown
        for name in expected:
            assert f"  {name}: " in shown, name
        assert main(["inspect", traced_path, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert [e["name"] for e in info["traced"]["exposed"]] == list(expected)
        assert info["traced"]["original_outputs"] == ["tags"]
        assert info["traced"]["masks"]["bi.backward"] == "bi.backward.mask"

        states_path = str(tmp_path / f"states{suffix}.h5")
        assert main(["states", traced_path, "--data", data_path, "-o", states_path, "--quiet"]) == 0
        with h5py.File(states_path, "r") as handle:
            for name in expected:
                np.testing.assert_allclose(handle["states"][name][()], expected[name], atol=1e-6, err_msg=name)

        out_dir = str(tmp_path / f"audit{suffix}")
        assert main(["audit", traced_path, "--data", data_path, "--labels", str(tmp_path / "depth.npy"),
                     "--out", out_dir, "--quiet"]) == 0
        with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as handle:
            layers = set(json.load(handle)["layers"])
        assert layers == {"encoder", "bi.forward", "bi.backward"}
        capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# Files saved by 0.1.0, which stored no record
# ---------------------------------------------------------------------------------------------


def test_traced_files_of_0_1_0_are_recognised_from_their_outputs(flavour):
    original = load_model(SAVED_BY_0_1_0 / f"{flavour.name}_original.keras")
    traced = load_model(SAVED_BY_0_1_0 / f"{flavour.name}_traced.keras")
    ids_ = np.load(SAVED_BY_0_1_0 / "ids.npy")
    record = traced.rewrite_record
    assert record is not None and record.source == "output names"
    assert record.original_output_names == ["tags"]
    by_name = {e.name: e for e in record.exposed}
    assert by_name["bi.backward.c"].time_order == "backward_aligned"
    assert by_name["encoder.c"].layer_class == "LSTM" and by_name["encoder.c"].units == 5

    states = cell_states(traced, ids_, states=("c",), progress=False)
    embedded = np.asarray(original.get_layer("embedding")(ids_))
    want = reference_lstm(original.get_layer("encoder"), embedded, flavour.name, mask=ids_ != 0)
    np.testing.assert_allclose(states["encoder.c"], want["c"], atol=1e-5, rtol=1e-4)
    report = audit(traced, ids_, progress=False)
    assert set(report.layers) == {"encoder", "bi.forward", "bi.backward"}


def test_the_record_survives_keras3_h5(tmp_path):
    """Keras 3's legacy .h5 writer names the model by its bare class name; it loads back traced."""
    import keras

    inputs = keras.Input((None, 3), name="x")
    model = keras.Model(inputs, keras.layers.LSTM(4, name="enc")(inputs))
    traced = expose_cell_states(model, states=("c", "h"))
    path = str(tmp_path / "traced.h5")
    traced.save(path)
    for loader in (keras.models.load_model, load_model):
        reloaded = loader(path)
        assert reloaded.rewrite_record == traced.rewrite_record
        x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32")
        np.testing.assert_array_equal(cell_states(reloaded, x, progress=False)["enc.h"],
                                      cell_states(traced, x, progress=False)["enc.h"])


def test_a_record_from_a_newer_release_is_refused(saved, tmp_path):
    """A stored record of a later format is not guessed at: the file is refused, with the fix."""
    import zipfile

    from lstm_rewrite import ModelFileError

    _, _, paths, _ = saved
    source, target = paths[".keras"], str(tmp_path / "newer.keras")
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            content = old.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                config["config"]["rewrite_record"]["format"] = 99
                content = json.dumps(config).encode()
            new.writestr(item, content)
    with pytest.raises(ModelFileError, match="newer.keras.*format 99.*Upgrade lstm_rewrite"):
        load_model(target)
