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
    run.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="train with N processes (DistributedDataParallel, launched by torch.distributed.run)")

    bench = sub.add_parser("bench", help="measure an artifact's latency on target profiles")
    bench.add_argument("artifact", type=Path)
    bench.add_argument("--target", action="append", required=True, help="profile name (see `compress targets`)")
    bench.add_argument("--batch", type=int, action="append", help="batch size(s); default: the recipe's")
    bench.add_argument("--warmup", type=int, default=None)
    bench.add_argument("--iterations", type=int, default=None)

    gate = sub.add_parser("gate", help="judge a report against budgets: exit 0 pass, 1 broken, 2 bad input, 3 measurement failed")
    gate.add_argument("report", type=Path, help="an artifact directory (can re-measure noisy latencies) or its report.json")
    gate.add_argument("--budgets", type=Path, required=True)
    gate.add_argument("--baseline", type=Path, help="baseline JSON for max_regression budgets (default: the budgets file's 'baseline:')")
    gate.add_argument("--update-baseline", type=Path, metavar="PATH", help="measure the artifact policy.baseline_runs times and write a baseline here")
    gate.add_argument("--baseline-runs", type=int, help="runs recorded by --update-baseline (default: policy.baseline_runs)")
    gate.add_argument("--remeasure", type=int, help="extra runs allowed while a latency verdict is inconclusive (default: policy.remeasure)")
    gate.add_argument("--inconclusive", choices=["fail", "pass"], help="what a still-inconclusive verdict becomes (default: policy.inconclusive)")
    gate.add_argument("--junit", type=Path, metavar="PATH", help="JUnit XML, one test case per budget")
    gate.add_argument("--markdown", type=Path, metavar="PATH", help="Markdown summary, appended (e.g. $GITHUB_STEP_SUMMARY)")
    gate.add_argument("--json", dest="json_path", type=Path, metavar="PATH", help="the verdicts as JSON")

    sweep = sub.add_parser("sweep", help="run variants of a recipe, measure all on one target, draw the accuracy/latency Pareto plot")
    sweep.add_argument("recipe", type=Path)
    sweep.add_argument("--variants", type=Path, help="variants YAML (default: the teacher, then each prefix of the recipe's stages)")
    sweep.add_argument("--out", type=Path, help="output directory (default: runs/<recipe name>-sweep)")
    sweep.add_argument("--target", help="profile to measure every variant on (default: the recipe's first target, else x86-cpu)")
    sweep.add_argument("--batch", type=int, default=None, help="batch size measured (default: 1)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field for every variant")
    sweep.add_argument("--overwrite", action="store_true", help="replace existing variant artifacts")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars (CI logs)")

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
    from compressor.train.distributed import launched_by_torchrun

    out = args.out or Path("runs") / recipe.name
    if args.nproc_per_node != 1 and not launched_by_torchrun():
        return _launch_distributed(args, recipe, out)
    from compressor.pipeline import compress

    report = compress(recipe, out, resume=args.resume, overwrite=args.overwrite, log=_console_log(), show_progress=not args.no_progress and sys.stderr.isatty())
    if recipe.budgets is not None and report:  # under torchrun only rank 0 has a report
        return _judge(out, recipe.budgets)
    return 0


def _launch_distributed(args, recipe, out: Path) -> int:
    """Re-run this command in N processes under torch.distributed.run (torchrun); its exit code is ours."""
    import subprocess

    from compressor.distill.strategy import check_recipe
    from compressor.errors import RecipeError

    if args.nproc_per_node < 1:
        raise RecipeError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    check_recipe(recipe)  # bad input fails here, with exit code 2, before N processes start
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
        "-m", "compressor.cli", *(["--debug"] if args.debug else []), "run", str(args.recipe), "--out", str(out),
        *[item for override in args.overrides for item in ("--set", override)],
        *[flag for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite), ("--no-progress", args.no_progress)) if on],
    ]  # fmt: skip
    return subprocess.run(command).returncode


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


def _judge(source: Path, budgets_path: Path, **options) -> int:
    from compressor.bench.ci_outputs import gate_with_outputs

    result = gate_with_outputs(source, budgets_path, log=_console_log(), **options)
    for line in result.lines():
        print(line)
    return result.exit_code


def _cmd_gate(args) -> int:
    return _judge(
        args.report, args.budgets, baseline_path=args.baseline, update_baseline=args.update_baseline,
        baseline_runs=args.baseline_runs, remeasure=args.remeasure, inconclusive=args.inconclusive,
        junit=args.junit, markdown=args.markdown, json_path=args.json_path,
    )  # fmt: skip


def _cmd_sweep(args) -> int:
    from compressor.bench.sweep import run_sweep

    result = run_sweep(
        args.recipe, variants=args.variants, out=args.out, target=args.target, batch=args.batch,
        overrides=args.overrides, overwrite=args.overwrite, log=_console_log(),
        show_progress=not args.no_progress and sys.stderr.isatty(),
    )  # fmt: skip
    for line in result.lines():
        print(line)
    return result.exit_code


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
    import compressor.data.text  # noqa: F401
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
    "sweep": _cmd_sweep,
    "verify": _cmd_verify,
    "targets": _cmd_targets,
    "models": _cmd_models,
}

if __name__ == "__main__":
    sys.exit(main())
