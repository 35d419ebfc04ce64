"""The README, executed: every ```python block in order, and every public name what it says it is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
VOCAB, T, SEQUENCES, ENCODER_UNITS = 6, 7, 5, 4


def python_blocks(path: str = README) -> list[tuple[int, str]]:
    """(line of the block's first code line, source) of each ```python block, in order."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


def claims(source: str) -> list[tuple[str, str]]:
    """``(expression, comment)`` for each line ``expression  # [..]`` or ``# (..)``: a value the
    README states, written as Python (an output-name list, a shape)."""
    found = []
    for line in source.splitlines():
        code, _, comment = line.partition("#")
        code, comment = code.strip(), comment.strip()
        if code and comment and comment[0] in "[(" and not code.endswith(("(", ",")) and "=" not in code:
            found.append((code, comment))
    return found


def readme_model(keras):
    """The README's names: ``model``, LSTMs ``encoder`` and ``decoder`` behind a masking Embedding."""
    keras.utils.set_random_seed(11)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB, 3, mask_zero=True, name="embed")(tokens)
    x = keras.layers.LSTM(ENCODER_UNITS, return_sequences=True, name="encoder")(x)
    x = keras.layers.LSTM(3, return_sequences=True, name="decoder")(x)
    return keras.Model(tokens, keras.layers.Dense(VOCAB, activation="softmax", name="next")(x), name="lm")


def readme_names(keras) -> dict:
    """``model``, ``x`` (padded ids), ``depth`` (a per-step label, NaN on padding) and ``vocab``."""
    rng = np.random.default_rng(3)
    x = rng.integers(1, VOCAB, size=(SEQUENCES, T)).astype("int32")
    lengths = [T, 5, 3, 6, 4]
    for row, n in enumerate(lengths):
        x[row, n:] = 0
    depth = np.where(x != 0, np.cumsum(np.where(x % 2 == 0, 1.0, -1.0), axis=1), np.nan)
    vocab = {i: w for i, w in enumerate(["<pad>", "(", ")", "a", "b", "c"])}
    return {"model": readme_model(keras), "x": x, "depth": depth, "vocab": vocab}


def test_readme_has_the_blocks_this_test_checks():
    sources = [source for _, source in python_blocks()]
    assert len(sources) >= 4, sources
    assert any("traced.output_names" in s for s in sources)
    assert any("from lstm_rewrite import audit" in s for s in sources)


def test_every_python_block_of_the_readme_runs(flavour, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme", **readme_names(flavour.keras)}
    # What the README's comments write as Python: a shape in words (sequences, time, units).
    sizes = {"sequences": SEQUENCES, "time": T, "units": ENCODER_UNITS}
    checked = []
    for line, source in python_blocks():
        # Line numbers in a traceback are the README's own.
        code = compile("\n" * (line - 1) + source, README, "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            raise AssertionError(f"README.md's python block at line {line} fails: "
                                 f"{type(error).__name__}: {error}") from error
        for expression, comment in claims(source):
            got = eval(expression, namespace)
            want = eval(comment, {**namespace, **sizes})
            got = tuple(got.shape) if hasattr(got, "shape") else list(got)
            want = tuple(want) if isinstance(got, tuple) else list(want)
            assert got == want, f"README.md line near {line}: {expression} is {got}, the README says {comment}"
            checked.append(expression)
    assert "traced.output_names" in checked and 'cs["encoder.c"]' in checked, checked

    from lstm_rewrite import AuditReport, CellStates

    model, traced = namespace["model"], namespace["traced"]
    assert traced is not model and len(traced.outputs) > len(model.outputs)
    assert isinstance(namespace["cs"], CellStates) and os.path.isfile("states.h5")
    namespace["cs"].close()
    report = namespace["report"]
    assert isinstance(report, AuditReport)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["labels"] == ["depth"]
    assert (tmp_path / "out" / "report.html").is_file()


IMPORTS = {
    "the README's import": "from lstm_rewrite import audit, AuditThresholds",
    "after importing the submodule": "import lstm_rewrite.audit\nfrom lstm_rewrite import audit, AuditThresholds",
    "after importing from the submodule":
        "from lstm_rewrite.audit import AuditReport\nfrom lstm_rewrite import audit, AuditThresholds",
    "as attributes, after the submodule": "import lstm_rewrite.audit, lstm_rewrite\n"
                                          "audit, AuditThresholds = lstm_rewrite.audit, lstm_rewrite.AuditThresholds",
}


@pytest.mark.parametrize("imports", list(IMPORTS.values()), ids=list(IMPORTS))
@pytest.mark.backend_independent(reason="the package's names in a fresh interpreter; no model runs")
def test_public_names_are_what_the_readme_says_in_a_fresh_interpreter(imports):
    # A fresh interpreter: in this one, other tests have already imported the submodules.
    check = imports + """
import inspect, lstm_rewrite
for name in lstm_rewrite.__all__:
    value = getattr(lstm_rewrite, name)
    assert inspect.isfunction(value) or inspect.isclass(value), (name, value)
assert audit is lstm_rewrite.audit and audit.__name__ == "audit" and inspect.isfunction(audit), audit
assert inspect.isclass(AuditThresholds)
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.backend_independent(reason="imports in a fresh interpreter; no model runs")
def test_importing_the_package_stays_cheap():
    check = """
import sys, lstm_rewrite
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"h5py", "matplotlib", "tensorflow", "keras", "tf_keras"})
assert not heavy, heavy
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert done.returncode == 0, done.stderr
