"""The bundled demo: paths to a small brackets-counting LSTM and its data, for examples and tests.

The model (``data/brackets.keras``, Keras 3) reads a nested-brackets language one character at a
time and predicts the next one; ``examples/train_brackets.py`` trains it deterministically. Its
``lstm`` layer keeps the nesting depth in one unit's cell state, which the audit should find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"


def demo_model_path() -> Path:
    """Return the path of the bundled demo model file (Keras 3 ``.keras``).

    Returns:
        The path of ``brackets.keras`` inside the installed package.

    Example:
        >>> demo_model_path().name
        'brackets.keras'
    """
    return DATA_DIR / "brackets.keras"


def demo_data_path() -> Path:
    """Return the path of the bundled ``.npz`` file (arrays ``x`` and ``depth``).

    Example:
        >>> demo_data_path().suffix
        '.npz'
    """
    return DATA_DIR / "brackets_data.npz"


def demo_data() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Return the bundled sequences, their per-step nesting depth and the vocabulary.

    Returns:
        ``(x, depth, vocab)``: ``x`` is an int32 array (200, 66) of character ids, right-padded
        with id 0; ``depth`` has the same shape and holds the nesting depth after each character
        (-1 on padded steps); ``vocab`` maps an id to its character (id 0 is ``"<pad>"``).

    Example:
        >>> x, depth, vocab = demo_data()
        >>> x.shape == depth.shape, vocab[1]
        (True, '(')
    """
    with np.load(demo_data_path()) as npz:
        x, depth = npz["x"], npz["depth"]
    raw = json.loads((DATA_DIR / "brackets_vocab.json").read_text())
    return x, depth, {int(k): v for k, v in raw.items()}


def decode(ids: np.ndarray, vocab: dict[int, str] | None = None) -> str:
    """Return the characters of one sequence of ids, padding dropped.

    Example:
        >>> decode(np.array([1, 3, 2, 6, 0, 0]))
        '(a).'
    """
    vocab = vocab if vocab is not None else demo_data()[2]
    return "".join(vocab[int(i)] for i in ids if int(i) != 0)


def load_demo_model(flavour: str = "keras3"):
    """Load the demo model in the requested Keras flavour.

    The file is a Keras 3 ``.keras`` archive. For ``"tfkeras"`` the same architecture is built
    with ``tf_keras`` and the weights are copied, which yields the same function in Keras 2.

    Args:
        flavour: ``"keras3"`` or ``"tfkeras"``.

    Returns:
        A compiled-free functional model: int ids (batch, time) -> next-character probabilities.

    Raises:
        ValueError: for an unknown flavour.

    Example:
        >>> model = load_demo_model("keras3")
        >>> model.get_layer("lstm").units
        16
    """
    from . import backends

    if flavour == "keras3":
        return backends.keras_module("keras3").saving.load_model(demo_model_path(), compile=False)
    if flavour == "tfkeras":
        source = load_demo_model("keras3")
        model = _build_brackets(backends.keras_module("tfkeras"), source)
        for name in ("embed", "lstm", "next_char"):
            model.get_layer(name).set_weights(source.get_layer(name).get_weights())
        return model
    raise ValueError(f"flavour must be 'keras3' or 'tfkeras'. Received: flavour={flavour!r}")


def _build_brackets(keras_module, source):
    """Rebuild the demo architecture in ``keras_module`` with the sizes of ``source``."""
    embed, lstm, dense = (source.get_layer(n) for n in ("embed", "lstm", "next_char"))
    inputs = keras_module.Input(shape=(None,), dtype="int32", name="chars")
    seq = keras_module.layers.Embedding(
        embed.input_dim, embed.output_dim, mask_zero=True, name="embed"
    )(inputs)
    seq = keras_module.layers.LSTM(lstm.units, return_sequences=True, name="lstm")(seq)
    out = keras_module.layers.Dense(dense.units, activation="softmax", name="next_char")(seq)
    return keras_module.Model(inputs, out, name="brackets")


def next_char_targets(x: np.ndarray, depth: np.ndarray, min_depth: int = 3) -> np.ndarray:
    """The next character at each step where the nesting depth is at least ``min_depth`` (-1 elsewhere):
    the labelled steps of the demo's causal metric, next-character accuracy on deeply nested positions.

    Example:
        >>> x, depth, _ = demo_data()
        >>> int((next_char_targets(x, depth) >= 0).sum()) > 0
        True
    """
    targets = np.full(x.shape, -1, dtype=np.int64)
    following = x[:, 1:]
    keep = (following != 0) & (depth[:, :-1] >= min_depth)
    targets[:, :-1] = np.where(keep, following, -1)
    return targets


def main(argv: list[str] | None = None) -> int:
    """Audit the demo model on its bundled data and write the report: ``python -m lstm_rewrite.demo``.

    Example:
        >>> main(["--out", "out/demo", "--quiet"])  # doctest: +SKIP
        0
    """
    import argparse

    from .audit import audit

    parser = argparse.ArgumentParser(
        prog="python -m lstm_rewrite.demo",
        description="Audit the bundled brackets LSTM against the nesting depth and write an HTML report.",
    )
    parser.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    parser.add_argument("--flavour", choices=("keras3", "tfkeras"), default="keras3")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    x, depth, vocab = demo_data()
    report = audit(load_demo_model(args.flavour), x, labels={"depth": depth}, vocab=vocab,
                   progress=not args.quiet)
    page = report.to_html(args.out)
    print(report.summary())
    print(f"Report: {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
