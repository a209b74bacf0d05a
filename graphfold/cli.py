"""Command line: ``graphfold IN.onnx -o OUT.onnx`` and the check / inspect / bench subcommands.

A thin layer over the API; the only module that prints. Exit codes: 0 done, 1 validation
failed (nothing written), 2 usage error or bad input, 3 internal error.
"""
from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.util
import logging
import os
import sys
import time
from typing import Sequence

from graphfold import api
from graphfold._version import __version__
from graphfold.engine import PassError
from graphfold.errors import GraphfoldError, UsageError, ValidationError
from graphfold.inputs import parse_input_shape, parse_input_value
from graphfold.io import ensure_writable
from graphfold.options import ApproxOptions, Options
from graphfold.passes import DEFAULT_PIPELINE

MAIN_EPILOG = """\
subcommands (run 'graphfold SUBCOMMAND --help'):
  graphfold check A.onnx B.onnx      are two models numerically equivalent?
  graphfold inspect IN.onnx          what can be folded, and why the rest is not
  graphfold bench A.onnx [B.onnx..]  onnxruntime latency comparison

examples:
  graphfold model.onnx -o model.folded.onnx
  graphfold model.onnx -o out.onnx --input-shape input:1,3,224,224 --report report.json
  graphfold model.onnx -o out.onnx --skip-passes fold-affine --no-check
  graphfold model.onnx -o out.onnx --calibration cal.npz --tolerance 1e-2 --epsilon 1e-4 --snap-slope 0.99
  graphfold model.onnx -o out.onnx --calibration cal.npz --labels labels.npy --refit --max-accuracy-drop 0.5

Every rewrite graphfold makes by default is exact: outputs equal up to float rounding.
The result is checked against the original with onnxruntime (optimizations off on both
sides, seeded random inputs); if it does not match, the model is not written (a --report
still records why) and the exit code is 1. Exit codes: 0 done, 1 validation failed, 2 bad input or usage, 3 internal error.
"""


class Console:
    """stdout for results, stderr for progress and errors; quiet silences all but errors."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._live = sys.stderr.isatty() and not quiet
        self._start = time.monotonic()
        self._shown = False

    def out(self, text: str = "") -> None:
        if not self.quiet:
            self.clear()
            print(text)

    def progress(self, text: str) -> None:
        # Only on a terminal, and only once the run is long enough for it to matter.
        if self._live and time.monotonic() - self._start > 0.5:
            sys.stderr.write(f"\r\033[K{text}")
            sys.stderr.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                        help="concrete shape for a graph input with dynamic dims (repeatable), "
                             "used for validation, the cost model and MAC counts (default: 1 for the first "
                             "dim, 32 for the others); the written model keeps its dynamic dims")
    parser.add_argument("--input-value", action="append", default=[], metavar="NAME:VALUE",
                        help="a fixed value for an input random data would not fit, such as a sample rate "
                             "(sr:16000) or a state (h:0 fills it; a comma list takes --input-shape's shape; "
                             "or a .npy path); repeatable. Fed by validation, check, bench, and to "
                             "calibration data that lacks the input")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")


def _pass_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passes", metavar="A,B", help="run only these passes (see --list-passes)")
    parser.add_argument("--skip-passes", metavar="A,B", help="run the default pipeline without these passes")
    parser.add_argument("--fold-all", action="store_true",
                        help="do every exact merge, even where the cost model predicts it is slower")
    parser.add_argument("--freeze-initializer-inputs", action="store_true",
                        help="fold weights that are also listed as graph inputs (old exports list every "
                             "weight so); they stop being inputs. Without it they are left untouched, "
                             "since a caller may feed them at run time")


def _approximate(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "approximate folding (off by default)",
        "Rewrites that change the outputs, each measured on calibration data; all of them together stay "
        "within --tolerance, and the result is validated on that data at that tolerance (offenders are "
        "found by bisection and undone). The report lists the error each one adds, and the total.")
    group.add_argument("--calibration", metavar="FILE.npz",
                       help="real inputs, one array per graph input keyed by its name, samples on the first "
                            "axis (a .npy for a single-input model); an optional 'labels' array. Without it, "
                            "seeded random inputs stand in and the decisions are weaker")
    group.add_argument("--labels", metavar="FILE.npy",
                       help="one class per calibration sample: report top-1 accuracy before and after")
    group.add_argument("--tolerance", type=float, default=0.0, metavar="T",
                       help="largest relative output error accepted for the whole model, max|y' - y| / max|y| "
                            "per output on the calibration data (default 0: exact rewrites only)")
    group.add_argument("--snap-slope", type=float, metavar="A",
                       help="remove PRelu/LeakyRelu whose slopes all lie within 1 - A of 1 (Layer Folding), "
                            "and Relus never negative on the calibration data; the exact merges then apply")
    group.add_argument("--epsilon", type=float, metavar="E",
                       help="drop residual branches F with max|F| <= E on the calibration data (epsilon-ResNet)")
    group.add_argument("--drop-branches", type=int, default=0, metavar="N",
                       help="drop the N least important residual branches (Network Implosion): importance is "
                            "a learned branch scale in the graph, else the branch's measured share of its block")
    group.add_argument("--target-depth", type=int, metavar="D",
                       help="keep dropping the least important branches until the depth is at most D")
    group.add_argument("--allow-border", action="store_true",
                       help="merge a padded kxk conv after a kxk conv, which is exact in the interior only, "
                            "where the measured error allows (with the cost model's consent, or --fold-all)")


def _refit(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "learned folding (--refit)",
        "Replace whole blocks (residual units, inverted residuals, conv-act-conv pairs) by one conv, or erase "
        "residual branches, with weights refit by least squares on --calibration data so the network still "
        "computes what the original did. A held-out share of that data decides and validates; accuracy "
        "and agreement are reported on both parts. Approximate: measure on data the run never saw.")
    group.add_argument("--refit", action="store_true",
                       help="turn learned folding on (needs --calibration with real inputs)")
    group.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                       help="top-1 accuracy on the holdout may fall by at most this many points (needs --labels); "
                            "also bounds the share of changed classes unless --min-agreement says otherwise")
    group.add_argument("--min-agreement", type=float, metavar="F",
                       help="share of holdout samples whose top-1 class must match the original's "
                            "(default 1 - POINTS/100, or 0.99 without --max-accuracy-drop)")
    group.add_argument("--target-latency", type=float, metavar="R",
                       help="stop once the cost model estimates R x the original's cost")
    group.add_argument("--holdout", type=float, default=0.25, metavar="F",
                       help="share of calibration samples never fitted on, used for the decisions and the "
                            "final validation (default 0.25; at least 32 samples)")


def _approximate_kwargs(args: argparse.Namespace) -> dict:
    """The approximate stage's and refit's fields of ``Options``, from the command line."""
    kwargs = {"calibration": args.calibration, "labels": args.labels,
              "approx": ApproxOptions(args.tolerance, args.snap_slope, args.epsilon, args.drop_branches,
                                      args.target_depth, args.allow_border)}
    if args.refit:
        from graphfold.refit import RefitOptions

        kwargs["refit"] = RefitOptions(args.max_accuracy_drop, args.min_agreement, args.target_latency, args.holdout)
    elif args.max_accuracy_drop is not None or args.min_agreement is not None or args.target_latency is not None:
        raise UsageError("--max-accuracy-drop, --min-agreement and --target-latency budget a --refit run: "
                         "add --refit")
    return kwargs


def _options(args: argparse.Namespace, progress=None, check: bool = True) -> Options:
    """What the fold and inspect commands ask of the API."""
    return Options(passes=_split(args.passes), skip_passes=_split(args.skip_passes) or (), fold_all=args.fold_all,
                   input_shapes=_shapes(args.input_shape), input_values=_values(args.input_value),
                   freeze_initializer_inputs=args.freeze_initializer_inputs, check=check, progress=progress,
                   **_approximate_kwargs(args))


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphfold", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MAIN_EPILOG,
        description="Remove the depth a CNN does not need from its ONNX graph: fold BatchNorm and "
                    "per-channel affine ops into convs, drop Identity/Dropout and dead nodes, merge "
                    "Conv chains, skips and parallel branches into single Convs.")
    parser.add_argument("input", nargs="?", help="the ONNX model to optimize (never modified)")
    parser.add_argument("-o", "--output", help="where to write the optimized model (written atomically)")
    parser.add_argument("--report", metavar="PATH", help="write a JSON report: before/after statistics, "
                                                         "every rewrite, declines, validation")
    parser.add_argument("--no-check", action="store_true", help="skip validation against the original")
    parser.add_argument("--list-passes", action="store_true", help="list the passes in pipeline order and exit")
    parser.add_argument("--bench", action="store_true",
                        help="after writing, compare onnxruntime latency of the input and the output "
                             "(CPU, full optimization, interleaved rounds)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for --bench (default 1)")
    parser.add_argument("--version", action="version", version=f"graphfold {__version__}")
    _pass_selection(parser)
    _approximate(parser)
    _refit(parser)
    _common(parser)
    return parser


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _shapes(specs: Sequence[str]) -> dict[str, list[int]] | None:
    return dict(parse_input_shape(s) for s in specs) or None


def _values(specs: Sequence[str]) -> dict | None:
    values = {}
    for spec in specs:
        name, value = parse_input_value(spec)
        if name in values:
            raise UsageError(f"--input-value {name} is given twice")
        values[name] = value
    return values or None


def run_fold(args: argparse.Namespace, console: Console) -> int:
    if args.list_passes:
        for p in DEFAULT_PIPELINE:
            console.out(f"{p.name:28} {p.summary}")
        return 0
    if not args.input:
        raise UsageError("missing input model (usage: graphfold IN.onnx -o OUT.onnx; see --help)")
    if not args.output:
        raise UsageError("missing -o/--output (graphfold never overwrites its input)")
    ensure_writable(args.output, args.input)
    if args.report:
        ensure_writable(args.report, args.input)
        if os.path.abspath(args.report) == os.path.abspath(args.output):
            raise UsageError(f"{args.report}: --report and -o name the same file")
    _quiet_onnxruntime()
    try:
        report = api.fold_file(args.input, args.output, _options(args, console.progress, not args.no_check))
    except ValidationError as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            console.out(report.summary())
            if args.report:
                _write_text(args.report, report.to_json())
        raise
    if args.report:
        _write_text(args.report, report.to_json())
    console.out(f"graphfold {__version__}: {args.input} -> {args.output}")
    console.out(report.summary())
    if report.validation is None:
        console.out("validation skipped (--no-check)")
    if args.bench:
        from graphfold import bench

        result = bench.bench([args.input, args.output], threads=args.threads,
                             input_shapes=_shapes(args.input_shape), input_values=_values(args.input_value),
                             progress=lambda done, total: console.progress(f"timing round {done}/{total}"))
        console.out("")
        console.out(result.format_table())
    return 0


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            handle.write(text + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write report: {exc.strerror or exc}") from None


def run_check(argv: Sequence[str], console_quiet: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="graphfold check",
                                     description="Compare two models' outputs under onnxruntime "
                                                 "(optimizations off) on the same seeded random inputs.")
    parser.add_argument("reference", help="the original model")
    parser.add_argument("candidate", help="the model that should match it")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="pass when max|b - a| <= atol + rtol * max|a| per output (default 1e-4)")
    parser.add_argument("--seeds", type=int, default=3, help="number of random inputs (default 3)")
    _common(parser)
    args = parser.parse_args(argv)
    console = Console(args.quiet)
    _logging(args.verbose)
    result = api.check(args.reference, args.candidate, input_shapes=_shapes(args.input_shape),
                       input_values=_values(args.input_value), seeds=tuple(range(args.seeds)), rtol=args.rtol)
    for o in result.outputs:
        console.out(f"  {o.name:24} max abs {o.max_abs:.3g}  max rel {o.max_rel:.3g}  "
                    f"{'ok' if o.passed else 'MISMATCH'} {o.note}".rstrip())
    console.out(result.summary())
    if result.weak_warning():
        console.out(result.weak_warning())
    return 0 if result.passed else 1


def run_inspect(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="graphfold inspect",
                                     description="Show what graphfold would fold in a model and, for every "
                                                 "candidate it leaves alone, why.")
    parser.add_argument("input", help="the ONNX model")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    _pass_selection(parser)
    _approximate(parser)
    _refit(parser)
    _common(parser)
    args = parser.parse_args(argv)
    console = Console(args.quiet)
    _logging(args.verbose)
    _quiet_onnxruntime()
    report = api.inspect(args.input, _options(args))
    if args.json:
        console.out(report.to_json())
        return 0
    console.out(report.table())
    console.out(f"\nfoldable ({len(report.rewrites)}):")
    for r in report.rewrites:
        kind = "exact" if r.exact else f"approx <= {r.error_bound:.3g}"
        console.out(f"  {r.pass_name:26} {kind:8} {r.detail}")
    console.out(f"\nleft alone ({len(report.declines)}, by reason; every node with --json):")
    for line in report.decline_lines():
        console.out(line)
    return 0


def run_bench(argv: Sequence[str]) -> int:
    from graphfold import bench

    parser = argparse.ArgumentParser(prog="graphfold bench",
                                     description="Compare onnxruntime latency of models with the same inputs: "
                                                 "warm-up, then interleaved rounds so machine drift cancels; "
                                                 "min, median and p10-p90 spread, ratio to the first model, and "
                                                 "with one thread the ratio of this process's CPU time, which "
                                                 "other load on the machine does not inflate. Warns when p90/p10 "
                                                 "is over 1.2; ratios within 5% of 1 are ties.")
    parser.add_argument("models", nargs="+", help="ONNX models (the first is the baseline)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--batch", type=int, help="batch size for a dynamic leading dim (default 1)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="execution provider (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart of the medians")
    _common(parser)
    args = parser.parse_args(argv)
    console = Console(args.quiet)
    _logging(args.verbose)
    if args.plot:
        bench.plot_backend()  # refuse before the benchmark, not after it
    result = bench.bench(args.models, threads=args.threads, batch=args.batch,
                         input_shapes=_shapes(args.input_shape), input_values=_values(args.input_value),
                         provider=args.provider, rounds=args.rounds,
                         progress=lambda done, total: console.progress(f"round {done}/{total}"))
    console.clear()
    if args.json:
        import json

        console.out(json.dumps(result.to_dict(), indent=2))
    else:
        console.out(result.format_table())
    if args.plot:
        bench.plot(result, args.plot)
    return 0


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _reader_gone() -> int:
    """stdout's reader left (``graphfold bench --json | head``): stop quietly, as a program killed
    by SIGPIPE would, and keep Python's exit-time flush of stdout from raising again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured in a test)
        pass
    return 128 + 13  # SIGPIPE


def _quiet_onnxruntime() -> None:
    # The process is the CLI's: onnxruntime's global log (which the library leaves alone) would
    # add its own lines when graphsurgeon's constant-folding sessions meet a node they cannot run.
    # Set when onnxruntime is first imported, not by importing it here: a run that opens no
    # session (an exact --no-check fold with nothing to constant-fold) never loads it.
    runtime = sys.modules.get("onnxruntime")
    if runtime is not None:
        runtime.set_default_logger_severity(4)
    elif not any(isinstance(finder, _QuietOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietOnImport())


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when onnxruntime is about to be imported, wraps its loader so that
    the global log level is set right after the module has loaded, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "onnxruntime":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.set_default_logger_severity(4)


SUBCOMMANDS = {"check": run_check, "inspect": run_inspect, "bench": run_bench}
GLOBAL_OPTIONS = ("-q", "--quiet", "-v", "--verbose")


def _subcommand(argv: list[str]):
    """The subcommand ``argv`` names, after any global options, and its arguments (the global
    options moved to them): ``graphfold -q check A B`` is ``graphfold check A B -q``."""
    leading = 0
    while leading < len(argv) and argv[leading] in GLOBAL_OPTIONS:
        leading += 1
    # A model file named like a subcommand is still reachable as ./check.
    subcommand = SUBCOMMANDS.get(argv[leading]) if leading < len(argv) else None
    return subcommand, argv[leading + 1:] + argv[:leading]


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        # Run as the program, which owns the process: what the imports made lives to the end,
        # so the cyclic collector (fold runs it to free graphsurgeon's graph) need not walk it.
        gc.freeze()
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = "-q" in argv or "--quiet" in argv
    console = Console(quiet)
    try:
        subcommand, sub_argv = _subcommand(argv)
        if subcommand is not None:
            code = subcommand(sub_argv)
        else:
            args = main_parser().parse_args(argv)
            _logging(args.verbose)
            code = run_fold(args, console)
        sys.stdout.flush()  # a reader that left (| head) shows here, not in Python's exit-time flush
        return code
    except GraphfoldError as exc:
        console.clear()
        print(f"graphfold: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except PassError as exc:
        console.clear()
        print(f"graphfold: internal error: {exc} (please report it; nothing was written)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        console.clear()
        print("graphfold: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except MemoryError:
        console.clear()
        print("graphfold: error: out of memory", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line for the user, the traceback under -v
        console.clear()
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        print(f"graphfold: internal error: {type(exc).__name__}: {exc} (please report it; "
              "nothing was written)", file=sys.stderr)
        return 3
