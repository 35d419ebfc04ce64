"""A Bidirectional LSTM tagger over padded sentences (masking): expose both directions' cell states.

Padded steps (token id 0) are masked; the exposed states carry over them exactly as Keras does,
and the backward direction is aligned with input time, like the tagger's own output.

    python examples/bidirectional_tagger.py [--flavour keras3|tfkeras]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def build(keras, vocab=30, tags=4, units=8):
    layers = keras.layers
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedded = layers.Embedding(vocab, 8, mask_zero=True, name="embedding")(tokens)
    both = layers.Bidirectional(layers.LSTM(units, return_sequences=True), name="bi")(embedded)
    return keras.Model(tokens, layers.Dense(tags, activation="softmax", name="tags")(both), name="tagger")


def sentences(rng, n=256, length=12, vocab=30, tags=4):
    lengths = rng.integers(4, length + 1, size=n)
    tokens = rng.integers(1, vocab, size=(n, length)).astype("int32")
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    labels = tokens % tags  # a toy tag: learnable from the token alone
    return tokens, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", choices=["keras3", "tfkeras"], default="keras3")
    args = parser.parse_args(argv)
    import lstm_rewrite.backends as backends
    from lstm_rewrite import expose_cell_states

    keras = backends.keras_module(args.flavour)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build(keras)
    model.compile("adam", "sparse_categorical_crossentropy")
    tokens, labels = sentences(rng)
    model.fit(tokens, labels, epochs=2, batch_size=32, verbose=0)

    traced = expose_cell_states(model, states=("c", "gates"), expose_masks=True)
    print("traced outputs:", traced.output_names)
    outputs = dict(zip(traced.output_names, traced.predict(tokens[:3], verbose=0)))
    length = int((tokens[0] != 0).sum())
    forward, backward = outputs["bi.forward.c"][0], outputs["bi.backward.c"][0]
    print(f"sentence 0 has {length} tokens of {tokens.shape[1]}; bi.forward.c {forward.shape}")
    print("forward c of unit 0 per step (carried over the padding):", np.round(forward[:, 0], 3))
    print("backward c of unit 0 per step (input time):           ", np.round(backward[:, 0], 3))
    print("forget gate mean per direction:",
          round(float(outputs["bi.forward.f"][0, :length].mean()), 3),
          round(float(outputs["bi.backward.f"][0, :length].mean()), 3))


if __name__ == "__main__":
    main()
