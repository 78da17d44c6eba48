"""`compressor` command line: demo, run, bench, inspect, recipe.

Every failure ends in one line `error: …` on stderr and a non-zero exit; `--debug` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback

from compressor.core.errors import CompressorError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a terminated process


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _pipeline_options(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    parser.add_argument("--out", required=out_required, help="output folder")
    parser.add_argument("--recipe", help="YAML recipe (default: the built-in fusion recipe)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    parser.add_argument("--seed", type=int, help="override the recipe's seed")
    parser.add_argument("--speedup", type=float, help="goal: this p50 speedup over dense on --runtime (adds or sets "
                                                      "the recipe's search stage)")
    parser.add_argument("--runtime", choices=("tflite", "onnxruntime"),
                        help="runtime the --speedup goal is measured on")
    parser.add_argument("--keep-frontier", action="store_true",
                        help="also write the search's other operating points' files to OUT/frontier/<point>/")
    _common(parser)


def _model_safety(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-model-code", action="store_true",
                        help="let a Keras file run the code it carries (Lambda layers, custom classes); "
                             "only for files you made yourself")
    parser.add_argument("--custom-objects", action="append", metavar="PKG.MOD",
                        help="import this module (by name) and register its Keras layer classes; repeatable")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other failure: one `error: …` line naming the fix."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compressor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train the reference MNIST model and run the default recipe end to end")
    _pipeline_options(demo)

    run = sub.add_parser("run", help="compress your own model")
    run.add_argument("--model", help="Keras model: .keras, .h5 (tf-keras or Keras 3) or SavedModel dir")
    run.add_argument("--data", help=".npz with x_train,y_train,x_test,y_test; a folder of class "
                     "sub-folders of images; .tfrecord files (feature spec in the recipe's data.tfrecord); "
                     "mnist5k / digits; or pkg.mod:func returning arrays or tf.data.Datasets")
    run.add_argument("--resume", metavar="OUT", help="continue the interrupted run on output folder OUT from its "
                                                     "last finished stage, with the model, data and recipe its "
                                                     "checkpoint names (arguments given must match them)")
    _model_safety(run)
    _pipeline_options(run, out_required=False)

    bench = sub.add_parser("bench", help="benchmark a .tflite or .onnx file")
    bench.add_argument("--model", required=True, help="FILE.tflite or FILE.onnx")
    bench.add_argument("--data", help="labelled data for accuracy (else random inputs)")
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--runs", type=int, default=300)
    bench.add_argument("--warmup", type=int, default=50)
    bench.add_argument("--block", type=int, default=10,
                       help="back-to-back calls per file per turn, the first untimed (1: cold-cache figure)")
    bench.add_argument("--compare", help="a second file, run interleaved with the first (A B A B …)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--time-limit", type=float, metavar="SECONDS",
                       help="stop a file when one runtime call runs longer "
                            "(default 60, or COMPRESSOR_BENCH_TIME_LIMIT)")
    _common(bench)

    inspect = sub.add_parser("inspect", help="per-tensor sparsity and storage as stored in a file")
    inspect.add_argument("file", help="FILE.tflite, FILE.onnx or FILE.keras")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _model_safety(inspect)
    _common(inspect)

    recipe = sub.add_parser("recipe", help="print the default recipe")
    recipe.add_argument("--example", action="store_true", help="the default recipe with a comment on every field")
    _common(recipe)
    return parser


def _recipe(args, saved: dict | None = None):
    """The recipe file (default: built-in) with the command line's overrides; `saved`: the recipe of the
    run being resumed, the base when no --recipe is given."""
    from compressor.config.recipe import load_recipe, parse_recipe, with_goal

    if saved is not None and not getattr(args, "recipe", None):
        recipe = parse_recipe(saved)
    else:
        recipe = load_recipe(getattr(args, "recipe", None))
    if getattr(args, "seed", None) is not None:
        recipe = recipe.model_copy(update={"seed": args.seed})
    if getattr(args, "keep_frontier", False):
        recipe = recipe.model_copy(update={"keep_frontier": True})
    return with_goal(recipe, getattr(args, "speedup", None), getattr(args, "runtime", None))


def cmd_demo(args, reporter) -> int:
    from compressor.api import demo

    report = demo(args.out, recipe=_recipe(args), force=args.force, reporter=reporter)
    _summary(report, reporter)
    return 0


def cmd_run(args, reporter) -> int:
    from compressor.api import compress_file

    if args.resume and args.out and os.path.abspath(args.resume) != os.path.abspath(args.out):
        raise CompressorError(f"--resume '{args.resume}' and --out '{args.out}' differ; pass the interrupted run's "
                              "output folder once, as --resume OUT")
    if not (args.resume or args.out):
        raise CompressorError("the following arguments are required: --out (or --resume OUT to continue an "
                              "interrupted run)")
    saved = None
    if args.resume:  # what is not given comes from the checkpoint; what is given is checked against it by hash
        from compressor.run.checkpoint import saved_inputs

        saved = saved_inputs(args.resume)
        args.model, args.data = args.model or saved["model"], args.data or saved["data"]
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if not value]
    if missing:
        raise CompressorError(f"the following arguments are required: {', '.join(missing)} (or --resume OUT alone "
                              "to continue an interrupted run)")
    recipe = _recipe(args, saved["recipe"] if saved else None)
    report = compress_file(args.model, args.data, args.resume or args.out, recipe=recipe, force=args.force,
                           reporter=reporter, trust_model_code=args.trust_model_code,
                           custom_objects=args.custom_objects, resume=bool(args.resume))
    _summary(report, reporter)
    return 0


def cmd_bench(args, reporter) -> int:
    from compressor.cli.bench import bench_command

    print(bench_command(args, reporter))
    return 0


def cmd_inspect(args, reporter) -> int:
    from compressor.api import inspect
    from exporters.inspect import format_inspect

    report = inspect(args.file, trust_model_code=args.trust_model_code, custom_objects=args.custom_objects)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return 0


def cmd_recipe(args, reporter) -> int:
    from compressor.config.recipe import example_yaml

    print(example_yaml())
    return 0


def _summary(report: dict, reporter) -> None:
    """The final table on stdout: one line per file at batch 1, 1 thread."""
    from rich.console import Console
    from rich.table import Table

    if reporter.quiet or "results" not in report:  # a non-chief worker of a cluster has no files to show
        return
    table = Table(title="compressor: dense vs pruned (batch 1, 1 thread)")
    name = (report.get("metric") or {}).get("name", "accuracy")
    for col in ("variant", "runtime", name, "p50 ms", "gzip bytes", "verified"):
        table.add_column(col)
    ok = {v["file"]: v["ok"] for v in report["verification"]}
    for r in report["results"]:
        if r["batch"] == 1 and r["threads"] == 1:
            value = r["metric"]["value"] if r.get("metric") else r["accuracy"]
            table.add_row(r["variant"], r["runtime"], f"{value:.4f}", f"{r['latency_ms']['p50']:.4f}",
                          f"{r['gzip_bytes']:,}", "ok" if ok.get(r["file"]) else "FAILED")
    console = Console()
    console.print(table)
    for line in report.get("goal_notes", []) + report.get("baseline_notes", []) + report.get("int8_notes", []):
        console.print(f"note: {line}")


def _resume_hint(args) -> str:
    """After an interrupted `run` whose checkpoint holds finished stages: how to continue it."""
    from compressor.run.checkpoint import folder_for

    out = getattr(args, "resume", None) or getattr(args, "out", None)
    try:
        if args.command != "run" or not out or not (folder_for(out) / "manifest.json").is_file():
            return ""
    except (CompressorError, OSError):
        return ""
    return f"; its finished stages are kept: continue with `compressor run --resume {out}`"


_PATH_ARGS = (("model", "--model"), ("data", "--data"), ("out", "--out"), ("resume", "--resume"),
              ("recipe", "--recipe"), ("file", "FILE"), ("compare", "--compare"))


def _check_path_encoding(args) -> None:
    """A path whose bytes are not UTF-8 cannot be passed to TensorFlow or the runtimes; refused before
    any work, rather than failing after the training."""
    for attr, flag in _PATH_ARGS:
        value = getattr(args, attr, None)
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(value).decode("utf-8", "backslashreplace")
            raise CompressorError(f"{flag} '{shown}' is not valid UTF-8 (TensorFlow and the runtimes cannot open "
                                  "such paths); rename it, or pass a path whose name is UTF-8") from None


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "bench": cmd_bench, "inspect": cmd_inspect, "recipe": cmd_recipe}


ERROR_CHARS = 290  # with "error: " in front, a line stays within 300 characters


def one_line(message: str, limit: int = ERROR_CHARS) -> str:
    """The message on one line of at most `limit` characters: a name taken from a hostile file can be
    any length, and the cause (first) and the fix (last) must both stay readable, so the middle goes."""
    flat = " ".join(message.split())
    if len(flat) <= limit:
        return flat
    flat = re.sub(r"'([^']{72,})'", lambda m: f"'…{m.group(1)[-68:]}'", flat)  # a long quoted path keeps its tail
    if len(flat) <= limit:
        return flat
    head = limit * 3 // 5
    return f"{flat[:head]} … {flat[-(limit - head - 3):]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from compressor.run.outdir import Terminated, sigterm_as_exception
    from compressor.run.progress import Reporter

    reporter = Reporter(quiet=args.quiet)
    try:
        with sigterm_as_exception():
            _check_path_encoding(args)
            return COMMANDS[args.command](args, reporter)
    except CompressorError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if args.command in ("bench", "inspect"):  # nothing written: nothing to reassure about
            print(f"error: {what}", file=sys.stderr)
        else:
            print(f"error: {what}; no partial artifact was kept under its final name and a previous result in "
                  f"--out is untouched{_resume_hint(args)}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except Exception as exc:  # an unexpected failure still gets one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
