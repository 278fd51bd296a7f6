"""The `compress` command. It turns arguments into API calls; the logic lives in the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Distill, quantize and prune a model into a measured, gated edge artifact.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe: stages → export → parity → artifact (→ bench)")
    run.add_argument("recipe", type=Path)
    run.add_argument("--out", type=Path, help="artifact directory (default: runs/<recipe name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. train.epochs=3")
    run.add_argument("--dry-run", action="store_true", help="print the resolved recipe and do nothing")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an existing artifact / interrupted run")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (CI logs)")

    bench = sub.add_parser("bench", help="measure an artifact's latency on target profiles")
    bench.add_argument("artifact", type=Path)
    bench.add_argument("--target", action="append", required=True, help="profile name (see `compress targets`)")
    bench.add_argument("--batch", type=int, action="append", help="batch size(s); default: the recipe's")
    bench.add_argument("--warmup", type=int, default=None)
    bench.add_argument("--iterations", type=int, default=None)

    gate = sub.add_parser("gate", help="judge a report against budgets: exit 0 pass, 1 broken, 2 bad input")
    gate.add_argument("report", type=Path, help="report.json or an artifact directory")
    gate.add_argument("--budgets", type=Path, required=True)

    verify = sub.add_parser("verify", help="check an artifact's files against its manifest")
    verify.add_argument("artifact", type=Path)

    sub.add_parser("targets", help="list target profiles and check they are reachable")
    sub.add_parser("models", help="list built-in models, datasets, stage kinds and losses")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import warnings

    from compressor.errors import CompressorError

    # Third-party deprecation chatter (Brevitas, torch.onnx) buries our one-line messages.
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(brevitas|torch|onnxscript|transformers)\b.*")

    try:
        return _COMMANDS[args.command](args)
    except CompressorError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; checkpoints are kept: rerun the same command with --resume to continue", file=sys.stderr)
        return 130


def _console_log():
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    return lambda message: console.print(message, markup=False)


def _cmd_run(args) -> int:
    from compressor.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.budgets is not None:
        from compressor.bench.gate import load_budgets

        load_budgets(recipe.budgets)  # bad budgets fail now, not after an hour of training
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    from compressor.pipeline import compress

    out = args.out or Path("runs") / recipe.name
    report = compress(recipe, out, resume=args.resume, overwrite=args.overwrite, log=_console_log(), show_progress=not args.no_progress and sys.stderr.isatty())
    if recipe.budgets is not None:
        return _judge(report, recipe.budgets)
    return 0


def _cmd_bench(args) -> int:
    import json

    from compressor.artifact import MANIFEST
    from compressor.bench.run import bench_artifact
    from compressor.recipe import BenchSpec

    manifest = args.artifact / MANIFEST
    recipe_bench = json.loads(manifest.read_text()).get("recipe", {}).get("bench", {}) if manifest.is_file() else {}
    spec = BenchSpec(**recipe_bench)
    updates = {k: v for k, v in {"warmup": args.warmup, "iterations": args.iterations, "batches": args.batch}.items() if v is not None}
    spec = spec.model_copy(update=updates)
    bench_artifact(args.artifact, args.target, spec, log=_console_log())
    return 0


def _judge(report, budgets_path: Path) -> int:
    from compressor.bench.gate import exit_code, judge, load_budgets

    verdicts = judge(report, load_budgets(budgets_path))
    for verdict in verdicts:
        print(verdict.line())
    return exit_code(verdicts)


def _cmd_gate(args) -> int:
    from compressor.artifact import read_report

    return _judge(read_report(args.report), args.budgets)


def _cmd_verify(args) -> int:
    from compressor.artifact import verify

    problems = verify(args.artifact)
    for problem in problems:
        print(f"FAIL {problem}")
    if not problems:
        print(f"OK {args.artifact}: every file matches its sha256 in the manifest")
    return 1 if problems else 0


def _cmd_targets(args) -> int:
    from compressor.targets.profile import list_profiles, load_profile
    from compressor.targets.runner import get_runner

    for name in list_profiles():
        profile = load_profile(name)
        check = get_runner(profile).check()
        status = "ok" if check.ok else "unreachable"
        print(f"{name:20s} {status:12s} {getattr(check, 'detail', '')}")
    return 0


def _cmd_models(args) -> int:
    import compressor.data.digits  # noqa: F401
    from compressor.data.loaders import DATASETS
    from compressor.distill.losses import LOSSES
    from compressor.models.builtin import MODELS
    from compressor.stages import load_stage_modules

    print("models:  ", ", ".join(MODELS.names()))
    print("datasets:", ", ".join(DATASETS.names()))
    print("stages:  ", ", ".join(load_stage_modules().names()))
    print("losses:  ", ", ".join(LOSSES.names()))
    return 0


_COMMANDS = {
    "run": _cmd_run,
    "bench": _cmd_bench,
    "gate": _cmd_gate,
    "verify": _cmd_verify,
    "targets": _cmd_targets,
    "models": _cmd_models,
}

if __name__ == "__main__":
    sys.exit(main())
