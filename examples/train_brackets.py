"""Train the bundled demo model: a small LSTM that reads nested brackets and learns to count depth.

The language: balanced sequences over "(" and ")" with filler letters "a", "b", "c" between
them, nesting depth at most ``MAX_DEPTH``, 40 to 60 characters plus the closing tail, then an
end mark ".". The model predicts the next character at every step. The chance of opening
falls and the chance of closing rises with the depth, ")" is impossible at depth 0, "(" at
``MAX_DEPTH`` and "." anywhere but depth 0 past the minimum length, so the best prediction at
each step needs the current depth: a good model keeps a counter in its cell state.

Run from the repository root (about a minute on two CPU cores); it overwrites
``lstm_rewrite/data/brackets.keras``, ``brackets_data.npz`` and ``brackets_vocab.json``::

    python examples/train_brackets.py

and prints, as a check, the best Pearson correlation between one unit's cell state and the depth
on the bundled sequences, computed by a NumPy LSTM written from the equations.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")

import numpy as np

SEED = 1234
MAX_DEPTH = 5
MIN_LEN, MAX_LEN = 40, 60
# Longest possible sequence: the drawn length, then up to MAX_DEPTH closing brackets, then ".".
T = MAX_LEN + MAX_DEPTH + 1
VOCAB = {0: "<pad>", 1: "(", 2: ")", 3: "a", 4: "b", 5: "c", 6: "."}
ID = {ch: i for i, ch in VOCAB.items()}
EMBED, UNITS = 8, 16
N_TRAIN, N_BUNDLED = 3000, 200
EPOCHS, BATCH = 12, 64

OUT_DIR = Path(__file__).resolve().parent.parent / "lstm_rewrite" / "data"


def next_char_probs(depth: int) -> np.ndarray:
    """Return the probabilities of "(", ")", filler at ``depth`` (before the length is reached)."""
    filler = 0.2
    p_open = (1.0 - filler) * (1.0 - depth / MAX_DEPTH)
    p_close = (1.0 - filler) * (depth / MAX_DEPTH)
    return np.array([p_open, p_close, filler])


def generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` sequences; return right-padded ids (n, T) and the depth after each character.

    The depth of a padded step is -1; the depth after the end mark "." is 0.
    """
    x = np.zeros((n, T), dtype=np.int32)
    depth = np.full((n, T), -1, dtype=np.int32)
    for row in range(n):
        target_len = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        d, t = 0, 0
        while t < target_len:
            kind = rng.choice(3, p=next_char_probs(d))
            if kind == 0:
                ch, d = "(", d + 1
            elif kind == 1:
                ch, d = ")", d - 1
            else:
                ch = "abc"[int(rng.integers(3))]
            x[row, t], depth[row, t] = ID[ch], d
            t += 1
        while d > 0:  # close what is still open, then mark the end
            d -= 1
            x[row, t], depth[row, t] = ID[")"], d
            t += 1
        x[row, t], depth[row, t] = ID["."], 0
    return x, depth


def next_char_targets(x: np.ndarray) -> np.ndarray:
    """Shift ids left by one step: the target of the end mark and of padding is padding (0)."""
    y = np.zeros_like(x)
    y[:, :-1] = x[:, 1:]
    return y


def build_model(keras):
    """Return the demo architecture in the given Keras module (``keras`` or ``tf_keras``)."""
    inputs = keras.Input(shape=(None,), dtype="int32", name="chars")
    emb = keras.layers.Embedding(len(VOCAB), EMBED, mask_zero=True, name="embed")(inputs)
    seq = keras.layers.LSTM(UNITS, return_sequences=True, name="lstm")(emb)
    out = keras.layers.Dense(len(VOCAB), activation="softmax", name="next_char")(seq)
    return keras.Model(inputs, out, name="brackets")


def numpy_cell_states(model, x: np.ndarray) -> np.ndarray:
    """Return the LSTM's cell state (n, T, units) by the LSTM equations in NumPy (masked steps carry c)."""
    emb = model.get_layer("embed").get_weights()[0]
    kernel, recurrent, bias = model.get_layer("lstm").get_weights()
    units = recurrent.shape[0]
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    n, steps = x.shape
    h = np.zeros((n, units))
    c = np.zeros((n, units))
    cs = np.zeros((n, steps, units))
    for t in range(steps):
        z = emb[x[:, t]] @ kernel + h @ recurrent + bias
        i, f, g, o = np.split(z, 4, axis=1)
        c_new = sig(f) * c + sig(i) * np.tanh(g)
        h_new = sig(o) * np.tanh(c_new)
        valid = (x[:, t] != 0)[:, None]
        c = np.where(valid, c_new, c)
        h = np.where(valid, h_new, h)
        cs[:, t] = c
    return cs


def best_depth_unit(cs: np.ndarray, x: np.ndarray, depth: np.ndarray) -> tuple[int, float]:
    """Return (unit, r): the unit whose c has the largest |Pearson r| with depth over valid steps."""
    valid = x != 0
    c = cs[valid]  # [steps, units]
    d = depth[valid].astype(np.float64)
    r = np.array([np.corrcoef(c[:, u], d)[0, 1] for u in range(c.shape[1])])
    best = int(np.nanargmax(np.abs(r)))
    return best, float(r[best])


def main() -> int:
    import keras
    import tensorflow as tf

    random.seed(SEED)
    np.random.seed(SEED)
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()

    rng = np.random.default_rng(SEED)
    x_train, _ = generate(N_TRAIN, rng)
    x_bundled, depth_bundled = generate(N_BUNDLED, rng)

    model = build_model(keras)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x_train, next_char_targets(x_train), epochs=EPOCHS, batch_size=BATCH, shuffle=True, verbose=2)
    loss = model.evaluate(x_bundled, next_char_targets(x_bundled), verbose=0)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    model.save(OUT_DIR / "brackets.keras")
    np.savez_compressed(OUT_DIR / "brackets_data.npz", x=x_bundled, depth=depth_bundled)
    vocab = {str(i): ch for i, ch in VOCAB.items()}
    (OUT_DIR / "brackets_vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")

    unit, r = best_depth_unit(numpy_cell_states(model, x_bundled), x_bundled, depth_bundled)
    print(f"held-out loss {loss:.4f}; best depth-tracking unit lstm.c[{unit}], Pearson r = {r:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
