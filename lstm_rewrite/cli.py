"""Command line: ``lstm-rewrite inspect | expose | states | audit``, a thin shell over the library.

Every expected failure (a missing file, a model the rewrite cannot handle, data that does not fit)
prints one line on stderr and exits with status 2, without a traceback and without leaving a
partial output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .errors import DataError, InvalidArgumentError, LstmRewriteError, ModelFileError, VerificationError

EXIT_OK = 0
EXIT_ERROR = 2  # expected errors, like argparse's usage errors


# --------------------------------------------------------------------------------------------
# Reading the command's inputs.
# --------------------------------------------------------------------------------------------


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise InvalidArgumentError(f"Expected a comma-separated list such as 'c,h,gates'. Received: {value!r}")
    return items


def _load(path: str, unsafe: bool):
    from .loading import load_model

    return load_model(path, safe=not unsafe)


def _input_names(model) -> list[str]:
    from .inputs import input_specs

    return [s.name for s in input_specs(model)]


def _read_arrays(path: str, what: str) -> dict[str, Any]:
    """Read a .npy (one array, key "") or .npz (named arrays) file."""
    import numpy as np

    if not os.path.isfile(path):
        raise DataError(f"The {what} file {path!r} does not exist. Check the path. Received: {path!r}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError/zipfile errors
        raise DataError(
            f"Cannot read the {what} file {path!r} ({type(exc).__name__}: {exc}). Pass a .npy file "
            f"(one array) or a .npz file (np.savez) of numeric arrays. Received: {path!r}"
        ) from None
    if isinstance(loaded, np.ndarray):
        return {"": loaded}
    with loaded:
        return {key: loaded[key] for key in loaded.files}


def read_data(path: str, input_names: Sequence[str]):
    """Map a .npy/.npz file onto a model's inputs: one array, a dict by input name, or a list in order.

    Example:
        >>> read_data("x.npz", ["tokens", "features"])  # doctest: +SKIP
    """
    arrays = _read_arrays(path, "data")
    names = list(input_names)
    if list(arrays) == [""]:
        if len(names) != 1:
            raise DataError(
                f"{path!r} holds one array but the model takes {len(names)} inputs {names}. Save a .npz "
                f"with one array per input, keyed by input name: np.savez(path, **{{name: array}})."
            )
        return arrays[""]
    keys = list(arrays)
    if set(keys) == set(names):
        return {n: arrays[n] for n in names}
    positional = [f"arr_{i}" for i in range(len(names))]
    if keys == positional:
        return [arrays[k] for k in positional] if len(names) > 1 else arrays[keys[0]]
    if len(keys) == 1 and len(names) == 1:
        return arrays[keys[0]]
    raise DataError(
        f"{path!r} holds arrays {keys}, which do not match the model's inputs {names}. Key the arrays by "
        f"input name, or save them in input order with np.savez(path, *arrays). Received keys: {keys}"
    )


def read_labels(path: str) -> dict[str, Any]:
    """A .npy file is one label named "label"; a .npz file holds one label per key."""
    arrays = _read_arrays(path, "labels")
    return {"label": arrays[""]} if list(arrays) == [""] else arrays


def read_vocab(path: str | None) -> dict[int, str] | None:
    """A JSON list/object of words, or a text file with one word per line (line number = id)."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise DataError(f"The vocabulary file {path!r} does not exist. Check the path. Received: {path!r}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        try:
            words = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"The vocabulary file {path!r} is not valid JSON ({exc}).") from None
        if isinstance(words, list):
            return {i: str(w) for i, w in enumerate(words)}
        if isinstance(words, dict):
            try:
                return {int(k): str(v) for k, v in words.items()}
            except ValueError:
                return {int(v): str(k) for k, v in words.items()}
        raise DataError(f"The vocabulary file {path!r} must hold a JSON list or object of words.")
    return {i: w for i, w in enumerate(text.splitlines())}


# --------------------------------------------------------------------------------------------
# Commands.
# --------------------------------------------------------------------------------------------


def _site_config(layer) -> dict[str, Any]:
    keys = ("units", "return_sequences", "return_state", "go_backwards", "stateful", "activation",
            "recurrent_activation", "use_bias", "dropout", "recurrent_dropout", "unroll")
    config = layer.get_config()
    return {k: config[k] for k in keys if k in config}


def _other_recurrent_layers(model, covered: set[int], seen: set[int] | None = None,
                            prefix: str = "", backend=None) -> list[tuple[str, str]]:
    """Recurrent layers (the backend's ``RNN`` and its subclasses, or wrappers of one) that the
    rewrite's plan does not cover: reported as left alone."""
    from . import backends

    backend = backends.for_model(model) if backend is None else backend
    seen = set() if seen is None else seen
    found = []
    for layer in getattr(model, "layers", []):
        if id(layer) in seen or id(layer) in covered:
            continue
        seen.add(id(layer))
        name = f"{prefix}{layer.name}"
        if hasattr(layer, "layers"):
            found += _other_recurrent_layers(layer, covered, seen, name + ".", backend)
            continue
        inner = getattr(layer, "layer", None) or getattr(layer, "forward_layer", None)
        if isinstance(layer, backend.RNN) or isinstance(inner, backend.RNN):
            label = type(layer).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
            found.append((name, label))
    return found


def _file_and_model(info, model) -> dict[str, Any]:
    """What ``inspect`` says of every file: its format and writer, the model's inputs and outputs."""
    from .inputs import input_specs

    return {
        "file": {"path": info.path, "format": info.format, "flavour": info.flavour,
                 "keras_version": info.keras_version, "evidence": info.evidence},
        "model": {"name": model.name, "class": type(model).__name__,
                  "inputs": [{"name": s.name, "shape": [None, *s.shape], "dtype": str(s.dtype)}
                             for s in input_specs(model)],
                  "outputs": [str(n) for n in getattr(model, "output_names", None) or []]},
    }


def cmd_inspect(args) -> int:
    from .loading import inspect_model_file
    from .rewrite.record import record_of
    from .rewrite import plan_rewrite

    info = inspect_model_file(args.model)
    model = _load(args.model, args.unsafe)
    record = record_of(model)
    if record is not None:
        return _inspect_traced(info, model, record, args.json)
    states = _split(args.states) or ["c"]
    # The plan names what the rewrite would add without building anything.
    sites = plan_rewrite(model, layers=_split(args.layers), states=states)
    covered = {id(s.layer) for s in sites}
    result = {
        **_file_and_model(info, model),
        "recurrent_layers": [
            {"site": s.site, "layer": s.layer.name, "class": s.layer_class or type(s.layer).__name__,
             "kind": s.kind, "selected": bool(s.selected),
             "adds": list(s.output_names) if s.selected else [],
             "config": _site_config(s.layer.forward_layer if s.bidirectional else s.layer)}
            for s in sites
        ],
        "not_rewritten": [{"layer": n, "class": c} for n, c in _other_recurrent_layers(model, covered)],
        "states": list(states),
        "added_outputs": [name for s in sites if s.selected for name in s.output_names],
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return EXIT_OK
    f = result["file"]
    print(f"{f['path']}: {f['format']} file written by {f['flavour']} {f['keras_version'] or '(version not recorded)'}")
    m = result["model"]
    print(f"model {m['name']!r} ({m['class']}); inputs: "
          + ", ".join(f"{i['name']} {tuple(i['shape'])} {i['dtype']}" for i in m["inputs"]))
    if m["outputs"]:
        print(f"outputs: {', '.join(m['outputs'])}")
    print("recurrent calls (site: layer, class):")
    for site in result["recurrent_layers"]:
        flag = "" if site["selected"] else "  [not selected]"
        settings = ", ".join(f"{k}={v}" for k, v in site["config"].items())
        print(f"  {site['site']}: {site['layer']} ({site['class']}){flag}\n      {settings}")
    for other in result["not_rewritten"]:
        print(f"  {other['layer']} ({other['class']}): left as it is (not a layer the rewrite traces)")
    print(f"the rewrite adds (states {','.join(states)}): {', '.join(result['added_outputs'])}")
    print("expose --masks also adds <site>.mask for each call, 1.0 on valid steps")
    return EXIT_OK


def _inspect_traced(info, model, record, as_json: bool) -> int:
    """``inspect`` on a model that is already traced: what it exposes, from its record."""
    result = {
        **_file_and_model(info, model),
        "traced": {
            "record": record.source,  # "stored" in the file, or recovered from "output names"
            "method": record.method,
            "original_outputs": list(record.original_output_names),
            "exposed": [{"name": e.name, "layer": e.layer, "quantity": e.quantity, "class": e.layer_class,
                         "shape": [None, None, *e.shape], "time_order": e.time_order} for e in record.exposed],
            "masks": dict(record.masks),
        },
    }
    if as_json:
        print(json.dumps(result, indent=1))
        return EXIT_OK
    f, t = result["file"], result["traced"]
    print(f"{f['path']}: {f['format']} file written by {f['flavour']} {f['keras_version'] or '(version not recorded)'}")
    how = "its stored rewrite record" if record.source == "stored" else "its output names (saved without a record)"
    print(f"traced model {model.name!r}, by {how}; states, audit and --lstmvis take it as it is")
    print(f"original outputs: {', '.join(t['original_outputs'])}")
    print("exposed outputs (name: layer, class, time order):")
    for e in record.exposed:
        print(f"  {e.name}: {e.layer} ({e.layer_class}), {e.time_order}")
    if record.masks:
        print(f"mask outputs: {', '.join(record.masks.values())}")
    return EXIT_OK


def _temporary_sibling(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    base, suffix = os.path.splitext(os.path.basename(path))
    handle, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".partial{suffix}", dir=directory)
    os.close(handle)
    os.remove(tmp)  # Keras writes the file itself
    return tmp


def cmd_expose(args) -> int:
    import numpy as np

    from . import backends
    from .api import expose_cell_states
    from .loading import load_model
    from .verify import synthesize_inputs, verify

    out = args.output
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in (".keras", ".h5"):
        raise InvalidArgumentError(
            f"The output file must end in .keras or .h5 (the format is chosen by the name). Received: -o {out!r}"
        )
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise InvalidArgumentError(f"The directory of {out!r} does not exist. Create it first. Received: -o {out!r}")
    model = _load(args.model, args.unsafe)
    traced = expose_cell_states(model, states=_split(args.states) or ["c"], layers=_split(args.layers),
                                expose_masks=args.masks)
    tmp = _temporary_sibling(out)
    try:
        traced.save(tmp)
        # Verify the file, not only the model in memory: reload it, compare the original outputs
        # with the original model and the state outputs with the traced model.
        try:
            reloaded = load_model(tmp, safe=not args.unsafe)
        except ModelFileError as error:
            advice = " Write it as .keras instead." if suffix == ".h5" else ""
            raise ModelFileError(
                f"The traced model was saved as {suffix} but cannot be read back, so {out!r} was not written: "
                f"{_one_line(error).replace(repr(tmp), 'the file')}.{advice}"
            ) from None
        report = verify(model, reloaded)
        inputs = synthesize_inputs(model)
        expected, got = traced(inputs, training=False), reloaded(inputs, training=False)
        expected = expected if isinstance(expected, (list, tuple)) else [expected]
        got = got if isinstance(got, (list, tuple)) else [got]
        # Through the backend: a torch tensor that requires grad refuses a plain np.asarray.
        to_numpy = backends.for_model(traced).to_numpy
        worst = max((float(np.max(np.abs(to_numpy(a) - to_numpy(b)))) for a, b in zip(expected, got)),
                    default=0.0)
        if not report.ok or len(expected) != len(got) or worst > 1e-5:
            raise VerificationError(
                f"The saved traced model {out!r} does not reproduce the traced model after reloading "
                f"(original outputs ok: {report.ok}; largest difference over all outputs {worst:.3g}). "
                f"Try the other format (.keras / .h5).", report)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    record = traced.rewrite_record
    print(f"wrote {out}: outputs {', '.join(traced.output_names)}")
    print(f"verified after reloading: {len(report.outputs)} original output(s) unchanged, "
          f"{len(record.exposed)} state output(s) identical")
    return EXIT_OK


def cmd_states(args) -> int:
    if args.beam:
        return _states_on_beam(args)
    import numpy as np

    from .capture import cell_states
    from .lstmvis import export_lstmvis

    out = args.output
    model = _load(args.model, args.unsafe)
    names = _input_names(model)
    data = read_data(args.data, names)
    vocab = read_vocab(args.vocab)
    tokens = None
    if args.lstmvis:
        tokens = data if not isinstance(data, (dict, list)) else None
        if tokens is None or np.asarray(tokens).ndim != 2 or np.asarray(tokens).dtype.kind not in "iu":
            raise DataError(
                f"--lstmvis needs token ids: a model with one integer input of shape (sequences, time). "
                f"The model's inputs are {names}; write the states without --lstmvis."
            )
    written = []
    try:
        # Without --states: c for a model traced here, everything a traced model already exposes.
        with cell_states(model, data, states=_split(args.states), layers=_split(args.layers),
                         batch_size=args.batch_size, out=out, progress=not args.quiet) as cs:
            written.append(out)
            shapes = ", ".join(f"{n} {tuple(cs[n].shape)}" for n in cs)
            if args.lstmvis:
                if vocab is None:
                    used = np.unique(np.asarray(tokens))
                    vocab = {int(i): str(int(i)) for i in used}
                if not os.path.exists(args.lstmvis):
                    written.append(args.lstmvis)  # export_lstmvis cleans up in a directory it did not make
                config = export_lstmvis(cs, args.lstmvis, tokens=np.asarray(tokens), vocab=vocab,
                                        name=model.name)
    except BaseException:
        _remove(written)
        raise
    print(f"wrote {out}: {shapes}")
    if args.lstmvis:
        print(f"wrote LSTMVis project {config}")
    return EXIT_OK


def _remove(paths: Sequence[str]) -> None:
    import shutil

    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def _note_synthesized(out_dir: str, note: str) -> None:
    """Record in report.json and report.html that the audited inputs were synthesized."""
    import html

    json_path = os.path.join(out_dir, "report.json")
    with open(json_path, encoding="utf-8") as handle:
        content = json.load(handle)
    content["data_source"] = note
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1, allow_nan=False)
        handle.write("\n")
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, encoding="utf-8") as handle:
        page = handle.read()
    marker = "</h1>"
    banner = f"<p><strong>Note:</strong> {html.escape(note)}</p>"
    page = page.replace(marker, marker + banner, 1) if marker in page else banner + page
    with open(html_path, "w", encoding="utf-8") as handle:
        handle.write(page)


def cmd_audit(args) -> int:
    if args.beam:
        if args.causal:
            # The causal section reruns the model with edits per unit: not a mergeable statistic.
            raise InvalidArgumentError("--causal runs on one machine: drop --beam, or audit a sample of the "
                                       "corpus with --causal. Received: --beam --causal")
        return _audit_on_beam(args)
    from .audit import audit

    labels = read_labels(args.labels) if args.labels else None
    vocab = read_vocab(args.vocab)
    note = None
    if args.model is None:
        from .demo import demo_data, demo_model_path

        if args.data:
            raise InvalidArgumentError("--data needs a MODEL: without one the bundled demo model and data are used.")
        model = _load(str(demo_model_path()), False)
        data, depth, demo_vocab = demo_data()
        vocab = vocab if vocab is not None else demo_vocab
        labels = labels if labels is not None else {"depth": depth}
        source = "the bundled demo model (brackets) and its sequences, labelled with the nesting depth"
    else:
        model = _load(args.model, args.unsafe)
        if args.data:
            data = read_data(args.data, _input_names(model))
            source = f"{args.model} on {args.data}"
        else:
            from .verify import synthesize_inputs

            data = synthesize_inputs(model, batch_size=args.synthesize, time_steps=args.time_steps)
            note = (f"no --data given: the {args.synthesize} input sequences were synthesized from the model's "
                    f"input specs (random values, {args.time_steps} steps where the length is open), so the "
                    f"statistics describe the model on noise, not on real data.")
            source = f"{args.model} on synthesized inputs"
            if labels is not None:
                raise InvalidArgumentError("--labels needs --data: labels must describe the audited sequences.")
    causal = {}
    if args.causal:
        if args.model is None:
            # The demo's question: does the model use its depth unit to predict the next character
            # where the brackets are deeply nested?
            from .demo import next_char_targets
            from .interventions import accuracy_metric

            causal = {"causal": True, "metric": accuracy_metric(), "targets": next_char_targets(data, depth)}
        else:
            causal = {"causal": True}
    report = audit(model, data, labels=labels, batch_size=args.batch_size, progress=not args.quiet,
                   vocab=vocab, **causal)
    out_dir = args.out
    existed = os.path.isdir(out_dir)
    try:
        page = report.to_html(out_dir)
        if note:
            _note_synthesized(out_dir, note)
    except BaseException:
        if not existed:
            _remove([out_dir])
        raise
    print(f"Audit of {source}.")
    if note:
        print(f"Note: {note}")
    print(report.summary())
    if report.causal:
        metric = ("next-character accuracy on steps nested at depth >= 3" if args.model is None
                  else "mean |change| of the first output")
        figure = pathlib.Path(out_dir, "causal.png").resolve()  # drawn with the report
        print(f"Causal metric: {metric}. Figure: {figure.as_uri()}")
    print(f"Report: {pathlib.Path(page).resolve().as_uri()} (and report.json, figures in {out_dir})")
    return EXIT_OK


def _beam_runner(pipeline_args: Sequence[str]):
    """Beam's in-process FnApiRunner unless the pipeline options name a runner (the default
    DirectRunner would first try to download the Prism runner)."""
    if any(a == "--runner" or a.startswith("--runner=") for a in pipeline_args):
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def _states_on_beam(args) -> int:
    from .beam import cell_states_on_beam

    if args.lstmvis:
        raise InvalidArgumentError("--lstmvis is not available with --beam: export LSTMVis from a local capture. "
                                   "Received: --lstmvis " + repr(args.lstmvis))
    out = cell_states_on_beam(args.model, args.data, args.output, states=_split(args.states),
                              layers=_split(args.layers), feature_spec=args.feature_spec,
                              batch_size=args.batch_size, safe=not args.unsafe,
                              runner=_beam_runner(args.pipeline_args), options=list(args.pipeline_args))
    from .capture import CellStates

    with CellStates.open(out) as cs:
        shapes = ", ".join(f"{n} {tuple(cs[n].shape)}" for n in cs)
    print(f"wrote {out} (index over the shards in {os.path.basename(out).rsplit('.', 1)[0]}-shards/): {shapes}")
    return EXIT_OK


def _audit_on_beam(args) -> int:
    from .beam import audit_on_beam

    if args.model is None or not args.data:
        raise InvalidArgumentError("--beam needs a MODEL and --data FILE_PATTERN (the corpus to audit). "
                                   f"Received: MODEL={args.model!r}, --data={args.data!r}")
    if args.labels:
        raise InvalidArgumentError("With --beam the labels live in the data shards: name them with --label-keys "
                                   f"(npz keys or TFRecord features) instead of --labels. Received: --labels {args.labels!r}")
    report = audit_on_beam(args.model, args.data, labels=_split(args.label_keys) or (),
                           feature_spec=args.feature_spec, batch_size=args.batch_size,
                           vocab=read_vocab(args.vocab), safe=not args.unsafe,
                           runner=_beam_runner(args.pipeline_args), options=list(args.pipeline_args))
    out_dir = args.out
    existed = os.path.isdir(out_dir)
    try:
        page = report.to_html(out_dir)
    except BaseException:
        if not existed:
            _remove([out_dir])
        raise
    print(f"Audit of {args.model} on {args.data} (Beam).")
    print(report.summary())
    print(f"Report: {pathlib.Path(page).resolve().as_uri()} (and report.json, figures in {out_dir})")
    return EXIT_OK


def parse_edit(spec: str, flag: str = "--ablate") -> tuple[str, Any, Any]:
    """``TARGET[:UNITS][@STEPS]`` (``lstm.c:11@20:``, ``bi.backward.h:0,3-5@2:8``) -> (target, units, steps)."""
    left, _, steps = spec.partition("@")
    target, _, units = left.partition(":")
    chosen = None
    if units:
        chosen = []
        try:
            for part in units.split(","):
                low, dash, high = part.partition("-")
                chosen += list(range(int(low), int(high) + 1)) if dash else [int(low)]
        except ValueError:
            raise InvalidArgumentError(
                f"{flag} takes TARGET[:UNITS][@STEPS], e.g. lstm.c:11@20: or lstm.c:0,3-5@2:8; the units are "
                f"indices and ranges. Received: {flag} {spec}") from None
    return target, chosen, (steps or None)


def cmd_intervene(args) -> int:
    import numpy as np

    from .interventions import Ablate, Clamp, Scale, run_intervened

    model = _load(args.model, args.unsafe)
    data = read_data(args.data, _input_names(model))
    value = args.value
    if value not in ("zero", "mean"):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgumentError(
                f"--value takes zero, mean or a number. Received: --value {args.value}") from None
    interventions = [Ablate(*parse_edit(spec), value=value) for spec in args.ablate or []]
    interventions += [Scale(*parse_edit(spec.rpartition("=")[0], "--scale"), factor=float(spec.rpartition("=")[2]))
                      for spec in args.scale or []]
    interventions += [Clamp(*parse_edit(spec.rpartition("=")[0], "--clamp"),
                            low=-abs(float(spec.rpartition("=")[2])), high=abs(float(spec.rpartition("=")[2])))
                      for spec in args.clamp or []]
    if not interventions:
        raise InvalidArgumentError("intervene needs at least one --ablate, --scale or --clamp. Received: none")
    from .interventions import _as_list, _predict, intervene

    arrays = [data[name] for name in _input_names(model)] if isinstance(data, dict) else data
    edited = intervene(model, interventions, data=arrays if value == "mean" else None)
    before = _predict(model, _as_list(arrays), args.batch_size)
    after = run_intervened(edited, arrays, batch_size=args.batch_size)
    names = edited.intervention_record.original_output_names
    rows = [{"output": n, "mean_abs_change": float(np.abs(a - b).mean()), "max_abs_change": float(np.abs(a - b).max()),
             "argmax_changed": float((a.argmax(-1) != b.argmax(-1)).mean()) if a.ndim > 1 and a.shape[-1] > 1 else None}
            for n, a, b in zip(names, after, before)]
    result = {"interventions": [i.to_dict() for i in interventions], "outputs": rows}
    if args.output:
        edited.save(args.output)
        result["saved"] = args.output
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for item in interventions:
            print(f"Intervention: {json.dumps(item.to_dict())}")
        for row in rows:
            changed = "" if row["argmax_changed"] is None else f", top prediction changed on {row['argmax_changed']:.1%}"
            print(f"{row['output']}: mean |change| {row['mean_abs_change']:.4g}, max {row['max_abs_change']:.4g}"
                  f"{changed} of steps")
        if args.output:
            print(f"Intervened model: {args.output}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Parser and entry point.
# --------------------------------------------------------------------------------------------


def _help_texts() -> tuple[str, str]:
    """The help of --states and --layers, read from the table of quantities and the registry."""
    from .kinds import all_kinds, quantities

    named = ",".join(quantities.ORDER)
    numbered = f"{quantities.numbered_state(0)},{quantities.numbered_state(1)},..."
    states = (f"quantities to expose: {named} (each layer exposes those it has), a custom cell's "
              f"{numbered}, or gates (default: c)")
    labels = ", ".join(kind.label for kind in all_kinds())
    layers = f"comma-separated names of the layers to rewrite, each a recurrent layer ({labels}) (default: all)"
    return states, layers


_STATES_HELP, _LAYERS_HELP = _help_texts()


def build_parser() -> argparse.ArgumentParser:
    """The ``lstm-rewrite`` argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="lstm-rewrite",
        description="Expose, capture and audit the cell states of the recurrent layers in a trained Keras model "
                    "(.keras or .h5, Keras 3 or tf-keras).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p, model_optional=False):
        if model_optional:
            p.add_argument("model", nargs="?", metavar="MODEL",
                           help="model file (.keras or .h5); default: the bundled demo model")
        else:
            p.add_argument("model", metavar="MODEL", help="model file (.keras or .h5)")
        p.add_argument("--unsafe", action="store_true",
                       help="load models whose Lambda layers carry Python code (runs that code: trusted files only)")
        p.add_argument("--verbose", action="store_true",
                       help="keep TensorFlow's own log on stderr (hidden by default, unless TF_CPP_MIN_LOG_LEVEL is set)")

    def selection(p):
        p.add_argument("--states", metavar="LIST", help=_STATES_HELP)
        p.add_argument("--layers", metavar="LIST", help=_LAYERS_HELP)

    p = sub.add_parser("inspect", help="list the recurrent calls and the outputs the rewrite would add")
    common(p)
    selection(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("expose", help="write the traced model (verified after reloading)")
    common(p)
    selection(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output model file (.keras or .h5)")
    p.add_argument("--masks", action="store_true", help="also output each layer's mask (<layer>.mask)")
    p.set_defaults(run=cmd_expose)

    p = sub.add_parser("states", help="capture states over a data set into an HDF5 file")
    common(p)
    selection(p)
    p.add_argument("--data", required=True, metavar="FILE",
                   help=".npy (one input) or .npz (keys = input names, or np.savez order)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="states file to write (HDF5)")
    p.add_argument("--lstmvis", metavar="DIR", help="also write an LSTMVis project directory")
    p.add_argument("--vocab", metavar="FILE", help="words for --lstmvis: JSON list/object or one word per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--beam", action="store_true",
                   help="run on Apache Beam (pip install 'lstm_rewrite[beam]'): --data is then a file pattern "
                        "of .npy/.npz shards or TFRecord files; pipeline options follow a '--'")
    p.add_argument("--feature-spec", metavar="FILE",
                   help="with --beam and TFRecord data: JSON name -> {dtype, shape} of the features to read")
    p.set_defaults(run=cmd_states)

    p = sub.add_parser("audit", help="audit every recurrent unit and write an HTML/JSON report")
    common(p, model_optional=True)
    p.add_argument("--data", metavar="FILE", help=".npy or .npz; default: synthesized inputs (noted in the report)")
    p.add_argument("--labels", metavar="FILE", help=".npy (one label) or .npz (one label per key), shaped (sequences, time)")
    p.add_argument("--out", default="lstm_audit", metavar="DIR", help="report directory (default: lstm_audit)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vocab", metavar="FILE",
                   help="token text for the report's coloured sequences: JSON list/object or one word per line")
    p.add_argument("--synthesize", type=int, default=64, metavar="N", help="sequences to synthesize without --data")
    p.add_argument("--time-steps", type=int, default=20, metavar="T", help="length of synthesized sequences")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--beam", action="store_true",
                   help="run on Apache Beam (pip install 'lstm_rewrite[beam]'): --data is then a file pattern "
                        "of .npy/.npz shards or TFRecord files; pipeline options follow a '--'")
    p.add_argument("--feature-spec", metavar="FILE",
                   help="with --beam and TFRecord data: JSON name -> {dtype, shape} of the features to read")
    p.add_argument("--label-keys", metavar="LIST",
                   help="with --beam: per-step label arrays stored in each shard (npz keys or TFRecord features)")
    p.add_argument("--causal", action="store_true",
                   help="also ablate each unit (and the units tracking each label, against random units) and "
                        "report the effect; writes causal.png")
    p.set_defaults(run=cmd_audit)

    p = sub.add_parser("intervene", help="run the model with units edited inside the recurrence; print the effect")
    common(p)
    p.add_argument("--data", required=True, metavar="FILE", help=".npy (one input) or .npz")
    p.add_argument("--ablate", action="append", metavar="TARGET[:UNITS][@STEPS]",
                   help="e.g. lstm.c:11@20: (c[11] of layer lstm from input step 20 on); repeatable")
    p.add_argument("--value", default="zero", help="what --ablate sets: zero (default), mean (over --data) or a number")
    p.add_argument("--scale", action="append", metavar="TARGET[:UNITS][@STEPS]=FACTOR", help="multiply; repeatable")
    p.add_argument("--clamp", action="append", metavar="TARGET[:UNITS][@STEPS]=BOUND", help="clip to [-B, B]; repeatable")
    p.add_argument("-o", "--output", metavar="OUT", help="also write the intervened model (.keras)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_intervene)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def _stderr_to_devnull():
    """Point the process's stderr (file descriptor 2, which C++ code writes to) at /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ log off the terminal, the CLI's own messages and progress bars on it.

    Level 3 hides what TensorFlow logs once it runs ("failed call to cuInit" on a machine without
    a GPU reads like a failure and is not one). What it logs while its libraries load (the oneDNN
    notice, "Could not find cuda drivers") comes before absl's logging is initialised and ignores
    that level, so TensorFlow is imported here with stderr pointed at /dev/null. An error from the
    import itself is still shown: it is raised once stderr is back.
    """
    from . import backends

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    backends.import_tensorflow(while_loading=_stderr_to_devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lstm-rewrite`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Example:
        >>> main(["inspect", "model.keras"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Beam's pipeline options (--runner=DataflowRunner --project=...) follow a "--", unparsed here.
    pipeline_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed)
        return int(stop.code or 0)
    args.pipeline_args = pipeline_args
    if pipeline_args and not getattr(args, "beam", False):
        print(f"lstm-rewrite {args.command}: error: pipeline options after '--' need --beam. "
              f"Received: -- {' '.join(pipeline_args)}", file=sys.stderr)
        return EXIT_ERROR
    # A level the user set is theirs to keep, and --verbose keeps everything.
    if not args.verbose and "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        _quiet_tensorflow()
    try:
        return args.run(args)
    except LstmRewriteError as error:
        print(f"lstm-rewrite {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # disk full, permission denied: the environment, not a bug
        print(f"lstm-rewrite {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"lstm-rewrite {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
