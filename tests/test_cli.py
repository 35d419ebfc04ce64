"""Command line: every command run in-process through main([...]), plus one real subprocess."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

import reference
from conftest import to_numpy
from lstm_rewrite.capture import CellStates
from lstm_rewrite.cli import main
from lstm_rewrite.loading import load_model

FLAVOURS = ("keras3", "tfkeras")
VOCAB, T = 7, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=FLAVOURS)
def flavour(request) -> str:
    return request.param


def kmod(flavour: str):
    return importlib.import_module("keras" if flavour == "keras3" else "tf_keras")


def token_model(flavour: str):
    k = kmod(flavour)
    k.utils.set_random_seed(4)
    tokens = k.Input((None,), dtype="int32", name="tokens")
    x = k.layers.Embedding(VOCAB, 3, mask_zero=True, name="emb")(tokens)
    x = k.layers.LSTM(4, return_sequences=True, name="encoder")(x)
    return k.Model(tokens, k.layers.Dense(VOCAB, activation="softmax", name="next")(x), name="toy")


def two_input_model(flavour: str):
    k = kmod(flavour)
    k.utils.set_random_seed(5)
    a, b = k.Input((None, 3), name="a"), k.Input((None, 2), name="b")
    ya = k.layers.LSTM(3, name="left")(a)
    yb = k.layers.LSTM(2, name="right")(b)
    return k.Model([a, b], k.layers.Concatenate(name="cat")([ya, yb]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model and data files shared by the module: saving models costs seconds."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    x = rng.integers(1, VOCAB, size=(12, T)).astype("int32")
    for row, n in enumerate(rng.integers(3, T + 1, size=12)):
        x[row, n:] = 0
    np.save(root / "tokens.npy", x)
    (root / "vocab.txt").write_text("\n".join(["<pad>", "a", "b", "c", "d", "e", "f"]) + "\n")
    made = {"root": root, "x": x}
    for fl in FLAVOURS:
        model = token_model(fl)
        model.save(root / f"{fl}.keras")
        made[fl] = (root / f"{fl}.keras", model)
        two = two_input_model(fl)
        two.save(root / f"{fl}_two.h5")
        made[fl, "two"] = (root / f"{fl}_two.h5", two)
    return made


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def reference_c(model, x: np.ndarray, flavour: str) -> np.ndarray:
    table = model.get_layer("emb").get_weights()[0]
    weights = model.get_layer("encoder").get_weights()
    return reference.lstm(table[x], *weights, mask=x != 0, flavour=flavour)["c"]


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# inspect / expose / states
# ---------------------------------------------------------------------------------------------


def test_inspect_text_and_json(flavour, files, capsys):
    path = files[flavour][0]
    code, out, _ = run(["inspect", path, "--states", "c,h"], capsys)
    assert code == 0
    assert f"written by {flavour}" in out and "encoder: encoder (LSTM)" in out
    assert "encoder.c, encoder.h" in out
    code, out, _ = run(["inspect", path, "--states", "gates", "--json"], capsys)
    info = json.loads(out)
    assert info["file"]["flavour"] == flavour
    assert [s["site"] for s in info["recurrent_layers"]] == ["encoder"]
    assert info["recurrent_layers"][0]["config"]["units"] == 4
    assert info["added_outputs"] == ["encoder.i", "encoder.f", "encoder.g", "encoder.o"]
    assert info["recurrent_layers"][0]["adds"] == info["added_outputs"]
    assert info["model"]["outputs"] == ["next"]
    assert info["model"]["inputs"] == [{"name": "tokens", "shape": [None, None], "dtype": "int32"}]


def test_inspect_lists_every_call_site(flavour, capsys, tmp_path):
    k = kmod(flavour)
    x = k.Input((5, 3), name="x")
    shared = k.layers.LSTM(3, return_sequences=True, name="shared")
    y = k.layers.Bidirectional(k.layers.LSTM(2, return_sequences=True), name="bi")(shared(shared(x)))
    y = k.layers.GRU(2, name="gru")(y)
    k.Model(x, y).save(tmp_path / "sites.keras")
    code, out, _ = run(["inspect", tmp_path / "sites.keras", "--json", "--layers", "shared,bi"], capsys)
    info = json.loads(out)
    assert [(s["site"], s["selected"]) for s in info["recurrent_layers"]] == [
        ("shared", True), ("shared.call1", True), ("bi", True), ("gru", False)]
    assert info["added_outputs"] == ["shared.c", "shared.call1.c", "bi.forward.c", "bi.backward.c"]
    assert info["recurrent_layers"][2]["class"] == "Bidirectional(LSTM)"


def test_expose_writes_a_verified_model(flavour, files, capsys, tmp_path):
    path, model = files[flavour]
    # Keras 3 cannot store the graph operation that computes the Embedding mask in a legacy .h5.
    out = tmp_path / ("traced.keras" if flavour == "keras3" else "traced.h5")
    code, stdout, _ = run(["expose", path, "-o", out, "--states", "c,h", "--layers", "encoder"], capsys)
    assert code == 0 and "verified after reloading" in stdout
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    traced = load_model(out)
    assert list(traced.output_names) == ["next", "encoder.c", "encoder.h"]
    x = files["x"]
    outputs = traced(x, training=False)
    np.testing.assert_allclose(to_numpy(outputs[0]), to_numpy(model(x)), atol=1e-5)
    np.testing.assert_allclose(to_numpy(outputs[1]), reference_c(model, x, flavour), atol=1e-5)


def test_states_with_lstmvis(flavour, files, capsys, tmp_path):
    path, model = files[flavour]
    root = files["root"]
    out, lv = tmp_path / "states.h5", tmp_path / "lv"
    code, stdout, _ = run(["states", path, "--data", root / "tokens.npy", "-o", out, "--states", "c,h",
                           "--lstmvis", lv, "--vocab", root / "vocab.txt", "--quiet"], capsys)
    assert code == 0 and "encoder.c (12, 8, 4)" in stdout
    x = files["x"]
    with CellStates.open(out) as cs:
        np.testing.assert_allclose(cs["encoder.c"][:], reference_c(model, x, flavour), atol=1e-5)
        np.testing.assert_array_equal(cs.lengths["encoder"], (x != 0).sum(axis=1))
    config = yaml.safe_load((lv / "lstm.yml").read_text())
    assert config["name"] == "toy" and [t["path"] for t in config["states"]["types"]] == ["encoder.c", "encoder.h"]
    assert (lv / "words.dict").read_text().splitlines()[1] == "a 1"
    with h5py.File(lv / "states.hdf5", "r") as handle:
        assert handle["encoder.c"].shape == ((x != 0).sum(), 4)


def test_states_of_a_two_input_model_from_npz(flavour, files, capsys, tmp_path):
    path, model = files[flavour, "two"]
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 6, 3)).astype("float32"), rng.normal(size=(5, 6, 2)).astype("float32")
    np.savez(tmp_path / "named.npz", b=b, a=a)
    np.savez(tmp_path / "ordered.npz", a, b)
    for name in ("named", "ordered"):
        out = tmp_path / f"{name}.h5"
        code, _, err = run(["states", path, "--data", tmp_path / f"{name}.npz", "-o", out, "--quiet"], capsys)
        assert code == 0, err
        with CellStates.open(out) as cs:
            np.testing.assert_allclose(cs["right.c"][:], reference.lstm(b, *model.get_layer("right").get_weights())["c"],
                                       atol=1e-5)
    np.savez(tmp_path / "wrong.npz", x=a, y=b)
    code, _, err = run(["states", path, "--data", tmp_path / "wrong.npz", "-o", tmp_path / "w.h5"], capsys)
    assert code == 2 and "['x', 'y'], which do not match the model's inputs ['a', 'b']" in error_line(err)
    assert not (tmp_path / "w.h5").exists()


# ---------------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------------


@pytest.mark.backend_independent(
    reason="the audit command without a model; test_demo.py audits the demo, and the audit tests below a saved "
           "model, on this backend")
def test_audit_of_the_bundled_demo(capsys, tmp_path):
    out = tmp_path / "report"
    code, stdout, _ = run(["audit", "--out", out, "--quiet"], capsys)
    assert code == 0
    assert "bundled demo model" in stdout and "Label 'depth' is strongly tracked by lstm.c[" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.html"} <= names and any(n.endswith(".png") for n in names)
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["depth"] and "data_source" not in report


def test_audit_of_a_model_with_data_and_labels(flavour, files, capsys, tmp_path):
    path = files[flavour][0]
    root, x = files["root"], files["x"]
    position = np.where(x != 0, np.arange(T)[None, :], np.nan)
    np.savez(tmp_path / "labels.npz", position=position)
    out = tmp_path / "report"
    code, stdout, err = run(["audit", path, "--data", root / "tokens.npy", "--labels", tmp_path / "labels.npz",
                             "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert "Label 'position'" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["position"] and report["sequences"] == len(x)


def test_audit_without_data_says_inputs_were_synthesized(flavour, files, capsys, tmp_path):
    out = tmp_path / "report"
    code, stdout, _ = run(["audit", files[flavour][0], "--out", out, "--quiet", "--synthesize", "6"], capsys)
    assert code == 0 and "synthesized" in stdout
    report = json.loads((out / "report.json").read_text())
    assert "6 input sequences were synthesized" in report["data_source"] and report["sequences"] == 6
    assert "were synthesized" in (out / "report.html").read_text()


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    import tf_keras

    root = tmp_path_factory.mktemp("hostile")
    marker = root / "marker"
    target = str(marker)
    x = tf_keras.Input((4, 3))
    y = tf_keras.layers.Lambda(lambda t: (open(target, "w").write("ran"), t)[1], name="evil")(x)
    tf_keras.Model(x, tf_keras.layers.LSTM(2, name="encoder")(y)).save(root / "hostile.h5")
    marker.unlink()
    return root / "hostile.h5", marker


@pytest.mark.backend_independent(reason="a tf-keras file, refused before it loads")
def test_hostile_model_is_refused_unless_unsafe(hostile, capsys, tmp_path):
    path, marker = hostile
    code, _, err = run(["expose", path, "-o", tmp_path / "t.keras"], capsys)
    assert code == 2 and "'evil' (Lambda)" in error_line(err) and "--unsafe" in err
    assert not marker.exists() and list(tmp_path.iterdir()) == []
    code, out, _ = run(["inspect", path, "--unsafe"], capsys)
    assert code == 0 and "encoder" in out and marker.exists()


def test_usage_and_input_errors(files, capsys, tmp_path):
    path = files["keras3"][0]
    root = files["root"]
    np.save(tmp_path / "floats.npy", np.full((2, T), 0.5))
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 5, 3)), b=np.zeros((2, 5, 2)))
    before = set(os.listdir(tmp_path))
    cases = [
        (["inspect", tmp_path / "missing.keras"], "does not exist"),
        (["inspect", tmp_path], "is a directory"),
        (["inspect", path, "--layers", "decoder"], "no LSTM of that name"),
        (["inspect", path, "--states", "c,x"], "Unknown state 'x'"),
        (["expose", path, "-o", tmp_path / "traced.pb"], "must end in .keras or .h5"),
        (["expose", path, "-o", tmp_path / "nodir" / "t.keras"], "does not exist"),
        (["expose", path, "-o", tmp_path / "t.h5"], "cannot be read back, so"),
        (["states", path, "--data", tmp_path / "floats.npy", "-o", tmp_path / "s.h5"], "fractional values"),
        (["states", path, "--data", tmp_path / "none.npy", "-o", tmp_path / "s.h5"], "does not exist"),
        (["states", files["keras3", "two"][0], "--data", root / "tokens.npy", "-o", tmp_path / "s.h5"],
         "holds one array but the model takes 2 inputs"),
        (["states", files["keras3", "two"][0], "--data", tmp_path / "two.npz", "-o", tmp_path / "s.h5",
          "--lstmvis", tmp_path / "lv"], "--lstmvis needs token ids"),
        (["audit", "--data", root / "tokens.npy", "--out", tmp_path / "r"], "--data needs a MODEL"),
        (["audit", path, "--labels", root / "tokens.npy", "--out", tmp_path / "r"], "--labels needs --data"),
    ]
    for argv, message in cases:
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert message in error_line(err), (message, err)
    assert set(os.listdir(tmp_path)) == before
    code, _, err = run(["expose", path], capsys)  # argparse: -o is required
    assert code == 2 and "required" in err
    assert run(["--help"], capsys)[0] == 0


@pytest.mark.backend_independent(
    reason="the console script on a tf-keras file; the in-process tests above run every command on this backend")
def test_subprocess_entry_point(files, tmp_path):
    """The installed console script (or ``python -m lstm_rewrite.cli`` without one), for real."""
    script = os.path.join(os.path.dirname(sys.executable), "lstm-rewrite")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "lstm_rewrite.cli"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    done = subprocess.run([*command, "inspect", str(files["tfkeras"][0]), "--states", "h"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "the rewrite adds (states h): encoder.h" in done.stdout


# ---------------------------------------------------------------------------------------------
# TensorFlow's own log stays off stderr, unless asked for
# ---------------------------------------------------------------------------------------------

# absl's and TensorFlow's C++ lines ("I0000 00:00:...", "E0000 ... failed call to cuInit", the
# oneDNN notice), and Python's "WARNING:absl:" / "WARNING:tensorflow:" records.
TF_LOG = re.compile(r"^([IWEF]\d{4} |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] )|absl|oneDNN|cuda|cuInit|tensorflow",
                    re.M | re.I)


def run_cli(argv, cwd, **env) -> subprocess.CompletedProcess:
    """The installed ``lstm-rewrite`` in a fresh process, without the test run's TF_CPP_MIN_LOG_LEVEL."""
    script = os.path.join(os.path.dirname(sys.executable), "lstm-rewrite")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "lstm_rewrite.cli"]
    child = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    child.update(PYTHONPATH=REPO, **env)
    return subprocess.run([*command, *map(str, argv)], capture_output=True, text=True, env=child, cwd=cwd,
                          timeout=300)


def test_tensorflow_log_stays_off_stderr(flavour, files, tmp_path):
    path = files[flavour][0]
    done = run_cli(["inspect", path], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "the rewrite adds (states c): encoder.c" in done.stdout
    assert not TF_LOG.search(done.stderr), done.stderr
    # The CLI's own progress bar and messages stay.
    done = run_cli(["states", path, "--data", files["root"] / "tokens.npy", "-o", tmp_path / "s.h5"], tmp_path)
    assert done.returncode == 0, done.stderr
    # The progress bar still shows (tqdm may clear it before drawing 100%: leave=False).
    assert "wrote " in done.stdout and "cell states:" in done.stderr
    assert not TF_LOG.search(done.stderr), done.stderr


@pytest.mark.backend_independent(
    reason="TensorFlow's start-up log kept by --verbose, the same flag handling on every backend; "
           "test_log_level_is_the_users checks it in-process")
def test_verbose_keeps_tensorflow_log(files, tmp_path):
    done = run_cli(["inspect", files["keras3"][0], "--verbose"], tmp_path)
    assert done.returncode == 0, done.stderr
    if not TF_LOG.search(done.stderr):
        pytest.skip("TensorFlow logs nothing at start-up on this machine: nothing to hide or keep")
    assert "the rewrite adds (states c): encoder.c" in done.stdout


@pytest.mark.parametrize("argv, user_level, level", [
    ([], None, "3"),            # quiet by default
    (["--verbose"], None, None),  # --verbose leaves the variable alone
    ([], "1", "1"),             # a level the user set is kept
])
def test_log_level_is_the_users(files, capsys, monkeypatch, argv, user_level, level):
    if user_level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", user_level)
    code, _, err = run(["inspect", files["keras3"][0], *argv], capsys)
    assert code == 0, err
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == level
