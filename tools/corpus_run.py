"""Run graphfold over every model bundled with the onnx package and print a table.

The corpus is ``onnx/backend/test/data/``: ``light/`` holds real architectures (AlexNet,
DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) with
constant weights and one reference output each, whose input onnx's backend runner makes
deterministically (``arange(n) / n`` in the input's shape); ``real/`` only points at the
``light/`` files; ``pytorch-converted/``, ``pytorch-operator/`` and ``simple/`` hold one
``model.onnx`` each with ``test_data_set_*/input_*.pb`` and ``output_*.pb``. The light models'
weights are ConstantOfShape nodes filling every tensor with 0.02, under which all classes get
the same logit and the softmax output is constant whatever a fold does; so each light model is
run a second time with those weights replaced by seeded random ones and the final Softmax
dropped, since a softmax of random logits saturates to one-hot ("random weights" rows,
compared with the original under onnxruntime only).

For each model the default pipeline runs exactly as ``graphfold IN -o OUT`` would (validation
on seeded random inputs included), and then the folded model is run on the bundled inputs
under onnxruntime and compared with the original's outputs and the bundled reference. A row
passes when the run completes or refuses with a clean ``UsageError``, the folded model passes
``onnx.checker``, its node count did not grow, and every output is within 1e-5 relative of the
original's (``max|y' - y| <= 1e-5 * max|y| + 1e-7``; exact for integer, bool and string
outputs). Models that onnxruntime cannot run (opset 6 kernels it dropped, string locales)
are run with onnx's reference evaluator instead, and counted apart; for the few that neither
can run, only the first three conditions can be checked.

    python tools/corpus_run.py [--groups light,simple,...] [--only NAME,...] [--json PATH]

Your own models: ``--models DIR`` runs every ``.onnx`` file under DIR instead, each with the
``--input-shape``/``--input-value`` it needs from the flags or a ``NAME.json`` sidecar (see --help).

    python tools/corpus_run.py --models ~/models [--input-value sr:16000] [--json rows.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import graphfold  # noqa: E402
from graphfold.errors import GraphfoldError, UsageError, first_line  # noqa: E402
from graphfold.inputs import parse_input_shape, parse_input_value  # noqa: E402
from graphfold.io import load_model  # noqa: E402
from graphfold.validate import Runner, compare_outputs  # noqa: E402

CORPUS = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
GROUPS = ("light", "pytorch-converted", "pytorch-operator", "simple")
USER_GROUP = "user"  # models under --models DIR
RTOL = 1e-5
ATOL = 1e-7  # the atol onnx's own backend tests use for these models

# Row statuses; only FAIL counts against graphfold.
OK = "ok"
OK_REFERENCE = "ok (reference evaluator)"  # compared under onnx.reference: onnxruntime cannot run it
NOT_RUNNABLE = "ok, not runnable"  # neither runtime can run the original: checker and node count only
REFUSED = "refused"  # a clean one-line UsageError
FAIL = "FAIL"
STATUSES = (OK, OK_REFERENCE, NOT_RUNNABLE, REFUSED, FAIL)


USER_HELP = """\
your own models (--models DIR):
  every .onnx under DIR is folded as 'graphfold IN -o OUT' would and judged like the corpus.
  --input-shape/--input-value apply to each model that has an input of that name; a sidecar
  NAME.json beside NAME.onnx gives one model its own, and wins:
    {"input_shape": ["input:1,3,224,224"], "input_value": ["sr:16000", "state:state.npy"]}
  (.npy paths relative to the sidecar). Models with test_data_set_*/ beside them are also
  compared on those inputs; otherwise graphfold's validation is the comparison, and a weak one
  is flagged in the row's note.
"""

# Weights beyond this many elements keep their constant fill in the random-weights variant
# (VGG's fully connected layers would add gigabytes).
MAX_RANDOM_ELEMENTS = 1 << 22
RANDOM_SUFFIX = "[random weights]"


@dataclass
class Case:
    name: str
    group: str
    path: str
    random_weights: bool = False
    # (inputs by graph input name, reference outputs in graph output order), per data set
    datasets: list[tuple[dict[str, Any], list[Any]]] = field(default_factory=list)
    # What a user gives with --input-shape / --input-value (user models only): specs by input name.
    input_shapes: dict[str, str] = field(default_factory=dict)
    input_values: dict[str, str] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    group: str
    status: str = FAIL
    nodes_before: int | None = None
    nodes_after: int | None = None
    rewrites: int = 0
    err_original: float | None = None  # folded vs original under onnxruntime, relative
    err_reference: float | None = None  # folded vs the bundled reference outputs, relative
    reference_baseline: float | None = None  # original vs the bundled reference, relative
    changed: bool = False  # some output is beyond RTOL relative (+ ATOL) of the original's
    seconds: float = 0.0
    note: str = ""


def discover(groups: Sequence[str] = GROUPS, root: str = CORPUS) -> list[Case]:
    """Every bundled model of ``groups``, with its inputs and reference outputs."""
    cases = []
    for group in groups:
        if group == "light":
            for path in sorted(glob.glob(os.path.join(root, "light", "*.onnx"))):
                name = os.path.splitext(os.path.basename(path))[0]
                cases.append(Case(name, group, path))
                cases.append(Case(f"{name}{RANDOM_SUFFIX}", group, path, random_weights=True))
        else:
            for folder in sorted(glob.glob(os.path.join(root, group, "*", ""))):
                path = os.path.join(folder, "model.onnx")
                if os.path.exists(path):
                    cases.append(Case(os.path.basename(folder.rstrip(os.sep)), group, path))
    return cases


def discover_user(folder: str, shape_specs: Sequence[str] = (), value_specs: Sequence[str] = ()) -> list[Case]:
    """Every ``.onnx`` under ``folder``, with the --input-shape/--input-value specs that apply to it:
    the flags', then its sidecar's (``NAME.json``), which win."""
    if not os.path.isdir(folder):
        raise UsageError(f"--models {folder}: no such folder")
    shapes, values = _by_name(shape_specs, "--input-shape"), _by_name(value_specs, "--input-value")
    cases = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.onnx"), recursive=True)):
        name = os.path.relpath(path, folder)
        own_shapes, own_values = _sidecar(path)
        cases.append(Case(name, USER_GROUP, path, input_shapes={**shapes, **own_shapes},
                          input_values={**values, **own_values}))
    if not cases:
        raise UsageError(f"--models {folder}: no .onnx files there")
    return cases


def _by_name(specs: Sequence[str], flag: str) -> dict[str, str]:
    named = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or not name or not rest:
            raise UsageError(f"bad {flag} {spec!r}: expected NAME:...")
        named[name] = spec
    return named


def _sidecar(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """The specs of ``NAME.json`` beside ``NAME.onnx`` (``.npy`` values made relative to it)."""
    sidecar = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(sidecar):
        return {}, {}
    try:
        with open(sidecar) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{sidecar}: not readable JSON ({first_line(exc)})") from None
    unknown = set(data) - {"input_shape", "input_value"} if isinstance(data, dict) else {"(not an object)"}
    if unknown:
        raise UsageError(f"{sidecar}: unknown keys {sorted(unknown)}; expected input_shape and input_value lists")
    values = []
    for spec in data.get("input_value", []):
        name, _, value = str(spec).partition(":")
        if value.endswith(".npy") and not os.path.isabs(value):
            spec = f"{name}:{os.path.join(os.path.dirname(sidecar), value)}"
        values.append(spec)
    return _by_name(data.get("input_shape", []), "input_shape"), _by_name(values, "input_value")


def real_alias_count(root: str = CORPUS) -> int:
    """``real/`` cases: each is a data.json pointing at a ``light/`` model (run there)."""
    return len(glob.glob(os.path.join(root, "real", "*", "data.json")))


def with_random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """``model`` with each ConstantOfShape weight replaced by a seeded random initializer:
    He-scaled for Conv/Gemm weights, in [0.5, 1.5] for BatchNorm scales and variances, small
    normal values elsewhere. A Softmax producing a graph output is dropped: its input becomes
    the output, so the comparison sees the logits."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    role = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            role.update({node.input[1]: "positive", node.input[4]: "positive"})
        elif node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            role[node.input[1]] = "weight-t" if node.op_type == "Gemm" and not trans_b else "weight"
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    outputs = {vi.name: vi for vi in out.graph.output}
    for node in graph.node:
        if node.op_type == "Softmax" and node.output[0] in outputs:
            outputs[node.output[0]].name = node.input[0]
            continue
        shape = initializers.get(node.input[0]) if node.op_type == "ConstantOfShape" and node.input else None
        if shape is None or int(np.prod(shape)) > MAX_RANDOM_ELEMENTS:
            out.graph.node.append(node)
            continue
        shape = tuple(int(d) for d in shape)
        kind = role.get(node.output[0])
        if kind == "positive":
            values = rng.uniform(0.5, 1.5, shape)
        elif kind in ("weight", "weight-t") and len(shape) >= 2:
            fan_in = shape[0] if kind == "weight-t" else int(np.prod(shape[1:]))
            values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        else:
            values = rng.standard_normal(shape) * 0.1
        init = numpy_helper.from_array(values.astype(np.float32), node.output[0])
        out.graph.initializer.append(init)
        if out.ir_version < 4:  # IR 3 lists every initializer as a graph input too
            out.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, shape))
    return out


def load_datasets(case: Case, model: onnx.ModelProto) -> list[tuple[dict[str, Any], list[Any]]]:
    if case.group == "light":
        inputs, outputs = _light_dataset(case, model)
        # The bundled reference was computed with the constant weights.
        return [(inputs, [] if case.random_weights else outputs)]
    datasets = []
    folder = os.path.dirname(case.path)
    for data_dir in sorted(glob.glob(os.path.join(folder, "test_data_set_*"))):
        inputs = {}
        # As onnx's backend runner does: input_i feeds the model's i-th graph input.
        for index in range(len(glob.glob(os.path.join(data_dir, "input_*.pb")))):
            vi = model.graph.input[index]
            inputs[vi.name] = _read_value(os.path.join(data_dir, f"input_{index}.pb"), vi.type)
        outputs = [_read_value(os.path.join(data_dir, f"output_{index}.pb"), vi.type)
                   for index, vi in enumerate(model.graph.output)
                   if os.path.exists(os.path.join(data_dir, f"output_{index}.pb"))]
        datasets.append((inputs, outputs))
    return datasets


def _light_dataset(case: Case, model: onnx.ModelProto) -> tuple[dict[str, Any], list[Any]]:
    """The input onnx's runner builds for light models (``generate_dummy_data(random=False)``)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
        size = int(np.prod(shape))
        inputs[vi.name] = (np.arange(size).reshape(shape) / size).astype(np.float32)
    prefix = os.path.splitext(case.path)[0]
    outputs = [_read_value(f"{prefix}_output_{index}.pb", vi.type)
               for index, vi in enumerate(model.graph.output) if os.path.exists(f"{prefix}_output_{index}.pb")]
    return inputs, outputs


def _read_value(path: str, type_proto: onnx.TypeProto) -> Any:
    with open(path, "rb") as handle:
        data = handle.read()
    if type_proto.HasField("sequence_type"):
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if type_proto.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if type_proto.HasField("map_type"):
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def output_error(ref: Any, out: Any) -> tuple[float, bool]:
    """(max|out - ref| / max|ref|, within tolerance) for a tensor or a sequence of them, as
    graphfold's own validation measures it (for non-float data: the fraction of elements that differ)."""
    error = compare_outputs("", ref, out, RTOL, ATOL)
    return error.max_rel, error.passed

def _input_shapes(model: onnx.ModelProto, feeds: dict[str, Any]) -> dict[str, list[int]] | None:
    """The bundled inputs' shapes for inputs with symbolic dims (what a user passes with
    --input-shape); None when every input is fixed or not a tensor."""
    shapes = {}
    initializers = {init.name for init in model.graph.initializer}
    for vi in model.graph.input:
        value = feeds.get(vi.name)
        if vi.name in initializers or not isinstance(value, np.ndarray) or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == value.ndim and value.size and any(not d.HasField("dim_value") for d in dims):
            shapes[vi.name] = list(value.shape)
    return shapes or None


class ReferenceRunner:
    """onnx's reference evaluator behind ``Runner``'s interface."""

    def __init__(self, model: onnx.ModelProto, what: str = "") -> None:
        from onnx.reference import ReferenceEvaluator

        self.session = ReferenceEvaluator(model)
        self.output_names = list(self.session.output_names)

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        names = set(self.session.input_names)
        return dict(zip(self.output_names, self.session.run(None, {k: v for k, v in feeds.items() if k in names})))


def _outputs(runner_type, model: onnx.ModelProto, datasets) -> list[list[Any]]:
    """Each data set's outputs, in graph output order."""
    runner = runner_type(model, "model")
    results = [runner.run(feeds) for feeds, _ in datasets]
    return [[result[name] for name in runner.output_names] for result in results]


def run_case(case: Case) -> Row:
    """Fold one bundled model and judge the result (never raises)."""
    row = Row(case.name, case.group)
    start = time.monotonic()
    try:
        _run_case(case, row)
    except Exception as exc:  # a crash of graphfold (or of this script): the row says which
        row.status = FAIL
        row.note = f"crash: {type(exc).__name__}: {first_line(exc)[:200]} [{_where(exc)}]"
    row.seconds = time.monotonic() - start
    return row


def _run_case(case: Case, row: Row) -> None:
    try:
        original = load_model(case.path)
    except UsageError as exc:
        row.status, row.note = REFUSED, f"load: {exc}"
        return
    if case.random_weights:
        original = with_random_weights(original)
        onnx.checker.check_model(original)
    case.datasets = load_datasets(case, original)
    shapes = _input_shapes(original, case.datasets[0][0]) if case.datasets else None
    try:
        given_shapes, values = _given(case, original)
    except UsageError as exc:
        row.status, row.note = REFUSED, str(exc)
        return
    shapes = {**(shapes or {}), **given_shapes} or None

    # The default run, validation on random inputs included, file to file as the command line
    # runs it (the weights read in place from the input and streamed to the output).
    default_note = ""
    with tempfile.TemporaryDirectory(prefix="corpus-") as scratch:
        source = case.path
        if case.random_weights:
            source = os.path.join(scratch, "in.onnx")
            onnx.save_model(original, source)
        target = os.path.join(scratch, "out.onnx")
        try:
            try:
                report = graphfold.fold_file(source, target, input_shapes=shapes, input_values=values)
            except UsageError as exc:
                # The original cannot run on random inputs (say, strings) or at all: fold unvalidated.
                default_note = f"default run refused: {exc}"
                try:
                    report = graphfold.fold_file(source, target, input_shapes=shapes, input_values=values,
                                                 check=False)
                except UsageError as again:  # bad --input-shape/--input-value for this model
                    row.status, row.note = REFUSED, str(again)
                    return
        except GraphfoldError as exc:
            row.status, row.note = FAIL, f"default run: {exc}"
            return
        folded = onnx.load(target)
    if report.validation is not None and report.validation.weak:
        default_note = f"validation weak: {', '.join(report.validation.weak_outputs)}"
    row.nodes_before, row.nodes_after = report.before["nodes"], report.after["nodes"]
    row.rewrites = len(report.rewrites)

    problems = []
    if row.nodes_after > row.nodes_before:
        problems.append(f"node count grew {row.nodes_before} -> {row.nodes_after}")
    try:
        onnx.checker.check_model(folded)
    except Exception as exc:
        problems.append(f"folded model fails onnx.checker: {first_line(exc)[:200]}")

    if not case.datasets:
        # No inputs of its own (a user model): graphfold's validation is the comparison.
        if report.validation is None:
            row.status = FAIL if problems else NOT_RUNNABLE
        else:
            row.err_original = report.validation.max_rel
            row.status = FAIL if problems else OK
        row.note = "; ".join(problems + ([default_note] if default_note else []))
        return
    runner_type, ok = Runner, OK
    try:
        original_out = _outputs(Runner, original, case.datasets)
    except Exception as exc:
        default_note = "; ".join(n for n in (default_note, f"onnxruntime: {first_line(exc)[:200]}") if n)
        try:
            runner_type, ok = ReferenceRunner, OK_REFERENCE
            original_out = _outputs(ReferenceRunner, original, case.datasets)
        except Exception as ref_exc:
            row.status = FAIL if problems else NOT_RUNNABLE
            row.note = "; ".join(problems + [default_note, f"reference evaluator: {first_line(ref_exc)[:200]}"])
            return
    try:
        folded_out = _outputs(runner_type, folded, case.datasets)
    except Exception as exc:
        row.status, row.note = FAIL, "; ".join(problems + [f"folded model does not run: {first_line(exc)[:200]}"])
        return
    errors = [output_error(r, o) for rs, os_ in zip(original_out, folded_out) for r, o in zip(rs, os_)]
    row.err_original = max((e[0] for e in errors), default=0.0)
    refs = [(ref, outs) for (_, ref), outs in zip(case.datasets, folded_out) if ref]
    if refs:
        row.err_reference = max(output_error(r, o)[0] for ref, outs in refs for r, o in zip(ref, outs))
        row.reference_baseline = max(output_error(r, o)[0]
                                     for (_, ref), outs in zip(case.datasets, original_out) if ref
                                     for r, o in zip(ref, outs))
    if not all(e[1] for e in errors):
        row.changed = True
        problems.append(f"outputs changed: max rel {row.err_original:.3g} vs the original")
    row.status = FAIL if problems else ok
    row.note = "; ".join(problems + ([default_note] if default_note else []))


def _given(case: Case, model: onnx.ModelProto) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """The case's --input-shape/--input-value specs for the inputs ``model`` has, parsed."""
    names = {vi.name for vi in model.graph.input}
    shapes = dict(parse_input_shape(spec) for name, spec in case.input_shapes.items() if name in names)
    values = dict(parse_input_value(spec) for name, spec in case.input_values.items() if name in names)
    return shapes, values


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{os.path.basename(last.filename)}:{last.lineno}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'model':48} {'nodes':>13} {'rewrites':>8} {'rel err':>8} {'vs ref':>8} {'ref base':>8}  status",
             "-" * 112]
    for r in rows:
        nodes = f"{r.nodes_before}->{r.nodes_after}" if r.nodes_before is not None else "-"
        lines.append(f"{r.group + '/' + r.name:48.48} {nodes:>13} {r.rewrites:>8} {_fmt(r.err_original):>8} "
                     f"{_fmt(r.err_reference):>8} {_fmt(r.reference_baseline):>8}  {r.status}")
        if r.note:
            lines.append(f"{'':50}{r.note[:160]}")
    return "\n".join(lines)


def summarize(rows: Sequence[Row]) -> str:
    count = {s: sum(1 for r in rows if r.status == s) for s in STATUSES}
    if rows and all(r.group == USER_GROUP for r in rows):
        weak = sum(1 for r in rows if "validation weak" in r.note)
        return (f"{len(rows)} models: {count[OK] + count[OK_REFERENCE]} ok ({weak} of them with weak validation), "
                f"{count[NOT_RUNNABLE]} folded but not validated (onnxruntime cannot run them; see the notes), "
                f"{count[REFUSED]} refused with a clean error, {count[FAIL]} failed; "
                f"{sum(r.rewrites for r in rows)} rewrites in all")
    crashes = sum(1 for r in rows if r.note.startswith("crash"))
    changed = sum(1 for r in rows if r.changed)
    grew = sum(1 for r in rows if r.nodes_after is not None and r.nodes_after > r.nodes_before)
    processed = len(rows) - count[FAIL]
    pct = 100.0 * processed / len(rows) if rows else 100.0
    variants = sum(1 for r in rows if r.name.endswith(RANDOM_SUFFIX))
    return (f"{len(rows)} runs ({len(rows) - variants} bundled models, {variants} light ones again with random "
            f"weights; the {real_alias_count()} real/ entries point at light/): "
            f"{processed} processed ({pct:.1f}%): {count[OK]} ok under onnxruntime, {count[OK_REFERENCE]} ok under "
            f"onnx's reference evaluator (onnxruntime cannot run them), {count[NOT_RUNNABLE]} that neither can run "
            f"(checker and node count only), {count[REFUSED]} refused with a clean error; {count[FAIL]} failed "
            f"({crashes} crashes, {changed} output changes over {RTOL:g} relative, {grew} node-count growths); "
            f"{sum(r.rewrites for r in rows)} rewrites in all")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=USER_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"corpus folders (default {','.join(GROUPS)})")
    parser.add_argument("--models", metavar="DIR", help="run every .onnx under DIR instead of the bundled corpus")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                        help="with --models: a shape for the input NAME of every model that has one (repeatable)")
    parser.add_argument("--input-value", action="append", default=[], metavar="NAME:VALUE",
                        help="with --models: a value for the input NAME of every model that has one, as "
                             "graphfold's --input-value takes it (repeatable)")
    parser.add_argument("--only", help="only models whose name contains one of these (comma-separated)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if (args.input_shape or args.input_value) and not args.models:
        parser.error("--input-shape and --input-value go with --models")
    try:
        cases = discover_user(args.models, args.input_shape, args.input_value) if args.models else \
            discover([g for g in args.groups.split(",") if g])
    except UsageError as exc:
        print(f"corpus_run: error: {exc}", file=sys.stderr)
        return 2
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    rows = []
    for case in cases:
        rows.append(run_case(case))
        print(f"\r\033[K{len(rows)}/{len(cases)} {case.name}", end="", file=sys.stderr, flush=True)
    print("\r\033[K", end="", file=sys.stderr)
    print(format_table(rows))
    print()
    print(summarize(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=1, default=str)
    return 1 if any(r.status == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
