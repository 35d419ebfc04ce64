"""Export stage: write captured states as an LSTMVis project directory.

LSTMVis (Strobelt et al., https://github.com/HendrikStrobelt/LSTMVis, README "Adding Your Own Data"
and docs/chapter/config_states.md) reads every sub-directory of its data directory that holds an
``lstm.yml``. A project needs three kinds of files, all of which treat the data set as ONE long
sequence of positions (sequences concatenated):

* an HDF5 file with one dataset per state type, shape ``(positions, cells)``
  (here ``states.hdf5``, one dataset per exposed output, e.g. ``encoder.c``);
* an HDF5 file with the word id at each position, shape ``(positions,)``
  (here ``words.hdf5``, dataset ``word_ids``);
* a ``.dict`` file mapping ids to words, one ``word id`` pair per line, separated by a space
  (here ``words.dict``). LSTMVis splits each line on whitespace, so a word cannot contain any.

``lstm.yml`` then names them:

* ``name``, ``description``: shown in the project list;
* ``files``: reference name -> file name (HDF5 files must end in ``.h5``/``.hdf5``, dictionaries in
  ``.dict``);
* ``word_sequence``: ``file`` (reference name of the word-id HDF5), ``path`` (dataset inside it),
  ``dict_file`` (reference name of the dictionary);
* ``states``: ``file`` (reference name of the states HDF5) and ``types``, a list of
  ``{type: state|output, layer: 1..n, path: <dataset>}`` with the optional ``unsigned: true``
  (values only positive) and ``transform: none`` (values already in [-1, 1] or [0, 1]; by default
  LSTMVis applies tanh).

Here ``h`` is ``type: output`` and every other quantity ``type: state``; what LSTMVis does to the
values follows their range in the table of quantities (`lstm_rewrite.kinds.quantities`): within
[0, 1] (the sigmoid gates ``i``, ``f``, ``o``, ``z``, ``r``) is ``unsigned: true, transform: none``,
within [-1, 1] (``h``, the tanh candidates ``g`` and ``n``) is ``transform: none``, and unbounded
(a cell state ``c``, a custom cell's states) keeps LSTMVis's default tanh. A ConvLSTM2D step is
flattened to one vector of ``rows * cols * filters`` cells.
``layer`` numbers the distinct layers in the order of the states. Padded steps are left out, so
positions are the real tokens only, and the states of a ``go_backwards`` LSTM (kept by the capture
in processing order) are flipped back to input order so that every position lines up with its token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import DataError, InvalidArgumentError
from .kinds import quantities

__all__ = ["export_lstmvis", "STATES_FILE", "WORDS_FILE", "DICT_FILE", "CONFIG_FILE"]

CONFIG_FILE = "lstm.yml"
STATES_FILE = "states.hdf5"
WORDS_FILE = "words.hdf5"
DICT_FILE = "words.dict"
WORD_IDS_PATH = "word_ids"

# Sequences copied per block: bounds memory when the states are read lazily from a file.
_BLOCK = 256


def _vocab_table(vocab) -> dict[int, str]:
    """Normalise a vocabulary to {id: word}: a list (index = id), {id: word} or {word: id}."""
    if isinstance(vocab, Mapping):
        items = list(vocab.items())
        if items and all(isinstance(k, str) for k, _ in items) and all(
                isinstance(v, (int, np.integer)) for _, v in items):
            table = {int(v): k for k, v in items}
        else:
            try:
                table = {int(k): str(v) for k, v in items}
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    "vocab must map ids to words ({0: '<pad>', 1: 'the'}) or words to ids, or be a list "
                    f"of words indexed by id. Received keys like {items[:3]!r}"
                ) from None
    elif isinstance(vocab, Sequence) and not isinstance(vocab, (str, bytes)):
        table = {i: str(w) for i, w in enumerate(vocab)}
    else:
        raise InvalidArgumentError(
            f"vocab must be a list of words indexed by id or a mapping. Received: {type(vocab).__name__}"
        )
    return table


def _dict_word(word: str) -> str:
    """LSTMVis splits dictionary lines on whitespace: a word must not contain any."""
    word = re.sub(r"\s", "_", word)
    return word if word else "<empty>"


def _common_mask(states, names: list[str], mask, shape: tuple[int, int]):
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise DataError(
                f"mask has shape {mask.shape} but the states hold {shape[0]} sequences of {shape[1]} steps. "
                f"Pass a (sequences, time) mask. Received: mask of shape {mask.shape}"
            )
        return mask > 0
    masks = getattr(states, "masks", None)
    if not masks:
        return None
    chosen, chosen_layer = None, None
    for name in names:
        layer = states.layer_of(name)
        layer_mask = masks.get(layer)
        if layer_mask is None:
            continue
        layer_mask = np.asarray(layer_mask) > 0
        if _runs_backwards(states, name):
            layer_mask = layer_mask[:, ::-1]
        if chosen is None:
            chosen, chosen_layer = layer_mask, layer
        elif not np.array_equal(chosen, layer_mask):
            raise InvalidArgumentError(
                f"The layers {chosen_layer!r} and {layer!r} have different masks, so their positions do not "
                f"line up in one LSTMVis sequence. Export them separately (names=...) or pass mask=. "
                f"Received: states {names}"
            )
    return chosen


def _quantity(states, name: str) -> str:
    exposed = getattr(states, "exposed", None)
    if exposed and name in exposed:
        return exposed[name]["quantity"]
    return name.rsplit(".", 1)[-1]


def _layer(states, name: str) -> str:
    exposed = getattr(states, "exposed", None)
    if exposed and name in exposed:
        return exposed[name]["layer"]
    return name.rsplit(".", 1)[0] if "." in name else name


def _runs_backwards(states, name: str) -> bool:
    """Whether the states run from the last input step to the first (the record's ``time_order``
    "go_backwards"): they are flipped to line up with the tokens.

    Capture files written before the time order was stored say ``reversed: true`` instead.
    """
    exposed = getattr(states, "exposed", None)
    info = exposed.get(name) if exposed else None
    if not info:
        return False
    if "time_order" in info:
        return info["time_order"] == "go_backwards"
    return bool(info.get("reversed"))


def _state_type(quantity: str, layer: int, path: str) -> dict:
    # LSTMVis's "output" is what the layer outputs at each step: of our quantities, h.
    entry: dict = {"type": "output" if quantity == "h" else "state", "layer": layer, "path": path}
    low, high = quantities.value_range(quantity)
    if low is not None and high is not None and low >= -1.0 and high <= 1.0:
        # Already within [-1, 1]: LSTMVis's default tanh would only squash it.
        if low >= 0.0:
            entry["unsigned"] = True
        entry["transform"] = "none"
    return entry


def export_lstmvis(
    states,
    out_dir: str | os.PathLike,
    *,
    tokens,
    vocab,
    name: str | None = None,
    description: str | None = None,
    names: Sequence[str] | None = None,
    mask=None,
) -> str:
    """Write ``states`` and the matching tokens as an LSTMVis project directory.

    Args:
        states: a ``CellStates`` (from ``cell_states``) or a mapping name -> ``(sequences, time,
            units)`` array (further axes, as for ConvLSTM2D, are flattened).
        out_dir: the project directory (created if missing); put it inside the directory passed to
            ``lstm_server.py -dir``.
        tokens: ``(sequences, time)`` integer word ids, aligned with the states' time axis.
        vocab: the words: a list indexed by id, ``{id: word}`` or ``{word: id}``.
        name: project name shown by LSTMVis (default: the model name or the directory name).
        description: a line shown under the name.
        names: which states to export (default: all).
        mask: ``(sequences, time)``, nonzero = real token. Default: the mask that ``cell_states``
            captured (padded steps are dropped), or every step when there is none.

    Returns:
        The path of the written ``lstm.yml``.

    Raises:
        DataError: tokens or mask do not match the states, or a token id is missing from vocab.
        InvalidArgumentError: unknown state names, bad vocab, or layers whose masks disagree.

    Example:
        >>> cs = cell_states(model, x, states=("c", "h"), progress=False)
        >>> export_lstmvis(cs, "lstmvis_data/brackets", tokens=x, vocab=["<pad>", "(", ")"])
        'lstmvis_data/brackets/lstm.yml'
    """
    import h5py
    import yaml

    available = list(states)
    names = available if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise InvalidArgumentError(
            f"No states named {unknown} to export; available: {available}. Received: names={names!r}"
        )
    first = states[names[0]]
    n_seq, n_steps = int(first.shape[0]), int(first.shape[1])
    for n in names:
        if tuple(states[n].shape[:2]) != (n_seq, n_steps):
            raise DataError(
                f"States {n!r} have shape {tuple(states[n].shape)} but {names[0]!r} has "
                f"{tuple(first.shape)}: export states of one capture together."
            )
    tokens = np.asarray(tokens)
    if tokens.shape != (n_seq, n_steps) or tokens.dtype.kind not in "iu":
        raise DataError(
            f"tokens must be integer word ids of shape (sequences, time) = ({n_seq}, {n_steps}), aligned "
            f"with the states. Received: array of shape {tokens.shape} and dtype {tokens.dtype}"
        )
    table = _vocab_table(vocab)
    valid = _common_mask(states, names, mask, (n_seq, n_steps))
    used = np.unique(tokens if valid is None else tokens[valid])
    missing = [int(t) for t in used if int(t) not in table]
    if missing:
        raise DataError(
            f"Token ids {missing[:10]} appear in tokens but not in vocab ({len(table)} entries). Pass the "
            f"vocabulary the model was trained with."
        )

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    layer_numbers: dict[str, int] = {}
    for n in names:
        layer_numbers.setdefault(_layer(states, n), len(layer_numbers) + 1)
    positions = int(n_seq * n_steps if valid is None else valid.sum())
    written = []
    try:
        states_path = os.path.join(out_dir, STATES_FILE)
        written.append(states_path)
        with h5py.File(states_path, "w") as handle:
            for n in names:
                source = states[n]
                # LSTMVis wants one vector per position: ConvLSTM2D steps are flattened.
                units = int(np.prod(source.shape[2:], dtype=np.int64))
                flip = _runs_backwards(states, n)
                target = handle.create_dataset(n, shape=(positions, units), dtype="float32",
                                               chunks=(min(max(positions, 1), 4096), units))
                at = 0
                # Copy a block of sequences at a time: the states may be a lazy, larger-than-memory file.
                for start in range(0, n_seq, _BLOCK):
                    block = np.asarray(source[start:start + _BLOCK], dtype=np.float32)
                    if flip:
                        block = block[:, ::-1]
                    block = block.reshape(block.shape[0], block.shape[1], units)
                    rows = block.reshape(-1, units) if valid is None else block[valid[start:start + _BLOCK]]
                    target[at:at + len(rows)] = rows
                    at += len(rows)
        words_path = os.path.join(out_dir, WORDS_FILE)
        written.append(words_path)
        with h5py.File(words_path, "w") as handle:
            flat = tokens.reshape(-1) if valid is None else tokens[valid]
            handle.create_dataset(WORD_IDS_PATH, data=flat.astype(np.int32))
        dict_path = os.path.join(out_dir, DICT_FILE)
        written.append(dict_path)
        with open(dict_path, "w", encoding="utf-8") as handle:
            for token_id in sorted(table):
                handle.write(f"{_dict_word(table[token_id])} {token_id}\n")
        model_name = getattr(states, "config", {}).get("model") if hasattr(states, "config") else None
        config = {
            "name": name or model_name or os.path.basename(os.path.abspath(out_dir)),
            "description": description or (
                f"{', '.join(names)}: {n_seq} sequences, {positions} positions (exported by lstm_rewrite)"),
            "files": {"states": STATES_FILE, "word_ids": WORDS_FILE, "words": DICT_FILE},
            "word_sequence": {"file": "word_ids", "path": WORD_IDS_PATH, "dict_file": "words"},
            "states": {
                "file": "states",
                "types": [_state_type(_quantity(states, n), layer_numbers[_layer(states, n)], n)
                          for n in names],
            },
        }
        config_path = os.path.join(out_dir, CONFIG_FILE)
        written.append(config_path)
        with open(config_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False, default_flow_style=False)
    except BaseException:
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        raise
    return config_path
