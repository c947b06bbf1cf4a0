"""``flexguard eval``, ``calibrate`` and ``moderate`` (registered by :mod:`flexguard_integrations.cli`).

Exit codes: 0 done; 1 done, but some rows carry a guard error (eval, moderate) or a calibration target was
not met on the validation split (calibrate); 2 the command could not run (bad data, configuration, an
existing output without ``--resume``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..guard import Guard
    from .data import Columns

__all__ = ["COMMANDS", "register", "run"]

COMMANDS = ("eval", "calibrate", "moderate")
EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2
_SURFACES = ("prompt", "response", "tool_call", "tool_result", "retrieved")


# ===================================================================== parser


def register(sub: Any) -> None:
    """Add the three subcommands to the ``flexguard`` subparsers."""
    from ..cli import _endpoint_options

    ev = sub.add_parser(
        "eval",
        help="evaluate a guard endpoint on labelled data (precision, recall, F1, FPR, AUROC, AUPRC)",
        description="Check every row of DATA (JSONL, CSV or Parquet with text, optional response, and label "
        "0/1 or severity 0-4) and report precision, recall, F1 and FPR for each strictness (strict, moderate, "
        "loose), AUROC and AUPRC on the score, and a confusion table per labelled category. Verdicts are "
        "saved to --out as they arrive; --resume continues an interrupted run. Exit 0 when done, 1 when some "
        "rows got a guard error (counted as flagged), 2 on an error.",
    )
    ev.add_argument("data", metavar="DATA", help="labelled data (.jsonl, .csv, .tsv, .parquet)")
    ev.add_argument("--out", metavar="PATH", help="verdicts JSONL (default: ./<DATA name>.verdicts.jsonl)")
    ev.add_argument(
        "--from-verdicts", action="store_true", help="DATA is a verdicts file of an earlier run: report only"
    )
    ev.add_argument(
        "--policies",
        metavar="DIR",
        help="evaluate the calibrated policies in DIR (strict.yaml, moderate.yaml, loose.yaml) instead of presets",
    )
    ev.add_argument("--policy", metavar="P", help="also report this policy (preset or YAML file)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.add_argument("--report", metavar="PATH", help="also write the report as JSON to PATH")
    _run_options(ev, concurrency=16)
    _data_options(ev)
    _endpoint_options(ev, base_url=True)

    cal = sub.add_parser(
        "calibrate",
        help="choose thresholds per strictness and category for a target (recall, precision or FPR)",
        description="Evaluate DATA (or read --from-verdicts), split it into validation and test, choose the "
        "threshold of each strictness and category that meets --target on the validation split, and write "
        "OUT_DIR/strict.yaml, moderate.yaml, loose.yaml (policies StrictnessPolicy.from_yaml loads), "
        "calibration.json and PNG plots (extra 'plots'). Exit 0 when done, 1 when a target could not be met, "
        "2 on an error.",
    )
    cal.add_argument("data", metavar="DATA", help="labelled data (.jsonl, .csv, .tsv, .parquet)")
    cal.add_argument(
        "--target", required=True, metavar="M=V", help="recall=0.95, precision=0.9 or fpr=0.05 (also 95%%)"
    )
    cal.add_argument("--out-dir", metavar="DIR", default="calibration", help="where to write (default ./calibration)")
    cal.add_argument("--verdicts", metavar="PATH", help="verdicts JSONL (default OUT_DIR/verdicts.jsonl)")
    cal.add_argument(
        "--from-verdicts", action="store_true", help="DATA is a verdicts file of an earlier run: no guard needed"
    )
    cal.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.7,
        metavar="F",
        help="share of rows used for choosing when DATA has no 'split' column (default 0.7; the rest is the "
        "test split the result is reported on); 1 = use every row",
    )
    cal.add_argument("--seed", type=int, default=0, help="seed of the id-hash split (default 0)")
    cal.add_argument(
        "--min-support",
        type=_positive_int,
        default=30,
        metavar="N",
        help="rows a category needs (named by the guard, both classes present) for its own threshold (default 30)",
    )
    cal.add_argument("--no-per-category", action="store_true", help="choose only the base thresholds")
    cal.add_argument(
        "--strictness",
        action="append",
        choices=("strict", "moderate", "loose"),
        help="calibrate only this strictness (repeatable; default all three)",
    )
    cal.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    _run_options(cal, concurrency=16)
    _data_options(cal)
    _endpoint_options(cal, base_url=True)

    mod = sub.add_parser(
        "moderate",
        help="moderate a whole corpus (JSONL, CSV, Parquet) into an output file, resumably",
        description="Check every row of IN with the policy and write one output row per input row to OUT "
        "(.jsonl, or .csv / .parquet written at the end): the row plus a 'flexguard' object with the action, "
        "score, categories, reason and error. Rows that cannot be checked carry the error and the fail-closed "
        "decision (block). --resume continues an interrupted run without losing or repeating a row. Exit 0 "
        "when every row was checked, 1 when some rows carry an error, 2 on an error.",
    )
    mod.add_argument("input", metavar="IN", help="corpus (.jsonl, .csv, .tsv, .parquet)")
    mod.add_argument("output", metavar="OUT", help="output (.jsonl, .csv, .tsv, .parquet)")
    mod.add_argument("--policy", metavar="P", help="preset (strict, moderate, loose) or a policy YAML file")
    mod.add_argument(
        "--surface",
        choices=_SURFACES,
        help="surface whose policy rules apply (default: retrieved, or response for rows with a response)",
    )
    mod.add_argument("--json", action="store_true", help="print the summary as JSON")
    _run_options(mod, concurrency=32)
    _data_options(mod, labels=False)
    _endpoint_options(mod, base_url=True)


def _run_options(p: argparse.ArgumentParser, *, concurrency: int) -> None:
    p.add_argument(
        "--transport",
        choices=("auto", "httpx", "aiohttp"),
        default="auto",
        help="HTTP client (default auto: aiohttp when installed, extra 'fast', much quicker at high concurrency; "
        "else httpx)",
    )
    p.add_argument(
        "--concurrency", type=_positive_int, default=concurrency, metavar="N",
        help=f"checks in flight (default {concurrency})",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (skip ids already written)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--retry-errors", action="store_true", help="with --resume: check again rows that got an error")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N rows")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def _data_options(p: argparse.ArgumentParser, *, labels: bool = True) -> None:
    g = p.add_argument_group("columns (default: the usual names, see docs/evaluation.md)")
    g.add_argument("--id-col", metavar="NAME", help="id column (default 'id'; else the row number)")
    g.add_argument("--text-col", metavar="NAME", help="text column (default 'text' or 'prompt')")
    g.add_argument("--response-col", metavar="NAME", help="response column (default 'response')")
    if labels:
        g.add_argument("--label-col", metavar="NAME", help="binary label column (default 'label')")
        g.add_argument("--severity-col", metavar="NAME", help="severity 0-4 column (default 'severity')")
        g.add_argument("--category-col", metavar="NAME", help="category column (default 'category')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


# ===================================================================== helpers


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _columns(args: argparse.Namespace) -> Columns:
    from .data import Columns

    return Columns.with_overrides(
        id=args.id_col,
        text=args.text_col,
        response=args.response_col,
        label=getattr(args, "label_col", None),
        severity=getattr(args, "severity_col", None),
        category=getattr(args, "category_col", None),
    )


def _guard(args: argparse.Namespace) -> Guard | None:
    """A Guard from the flags and FLEXGUARD_* variables, sized for ``--concurrency``; None without an endpoint."""
    from ..cli import _discover_model, _local_guard_or_none
    from ..guard import Guard

    env = os.environ
    base_url = args.base_url or env.get("FLEXGUARD_BASE_URL")
    if not base_url:
        return _local_guard_or_none(args, env)
    transport = args.transport
    if transport == "auto":
        transport = "aiohttp" if importlib.util.find_spec("aiohttp") is not None else "httpx"
    overrides: dict[str, Any] = {"base_url": base_url, "concurrency": args.concurrency, "transport": transport}
    for key in ("model", "family", "api_key", "timeout", "policy"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if not (args.model or env.get("FLEXGUARD_MODEL")):
        overrides["model"] = _discover_model(base_url, args.api_key or env.get("FLEXGUARD_API_KEY"))
    return Guard.from_env(env, **overrides)


def _progress(args: argparse.Namespace, total: int, label: str) -> Any:
    from .runner import Progress

    return Progress(total, label, enabled=not args.no_progress)


def _evaluate(args: argparse.Namespace, out: Path) -> tuple[list[Any], str]:
    """Records of DATA: read from a verdicts file, or checked now with a guard (saved to ``out``)."""
    from ..cli import _NO_ENDPOINT
    from ..errors import ConfigurationError
    from .data import read_examples
    from .runner import evaluate, load_records, refuse_same_file

    if args.from_verdicts:
        records = load_records(args.data)
        if args.limit:
            records = records[: args.limit]
        return records, "saved verdicts"
    refuse_same_file(args.data, out, "verdicts file")
    examples = read_examples(args.data, _columns(args), limit=args.limit)
    guard = _guard(args)
    if guard is None:
        raise ConfigurationError(_NO_ENDPOINT.removeprefix("flexguard: "))
    with guard:
        label = f"guard {guard.model_name} ({guard.model.family})"
        records = evaluate(
            guard,
            examples,
            out,
            concurrency=args.concurrency,
            resume=args.resume,
            overwrite=args.overwrite,
            retry_errors=args.retry_errors,
            progress=_progress(args, len(examples), args.command),
        )
    return records, label


# ===================================================================== commands


def run(args: argparse.Namespace) -> int:
    """Run ``flexguard eval`` / ``calibrate`` / ``moderate``; the exit code."""
    from ..errors import FlexGuardError, PolicyError
    from .data import long_csv_fields

    try:
        with long_csv_fields():  # a long document in a CSV is a row to moderate, not an unreadable file
            if args.command == "eval":
                return _eval(args)
            if args.command == "calibrate":
                return _calibrate(args)
            return _moderate(args)
    except PolicyError as exc:
        _err(f"flexguard {args.command}: bad policy: {exc}")
    except (FlexGuardError, OSError) as exc:
        _err(f"flexguard {args.command}: {exc}")
    return EXIT_ERROR


def _eval(args: argparse.Namespace) -> int:
    from ..policy import StrictnessPolicy
    from .calibrate import load_calibrated
    from .runner import build_report, format_report, preset_policies

    out = Path(args.out) if args.out else Path.cwd() / f"{Path(args.data).stem}.verdicts.jsonl"
    if args.report:  # before any check: the report must not replace the data or the verdicts
        from .runner import refuse_same_file

        refuse_same_file(args.data, args.report, "report")
        if not args.from_verdicts:
            refuse_same_file(out, args.report, "report")
    policies = load_calibrated(args.policies) if args.policies else preset_policies()
    extra = {}
    if args.policy:
        pol = StrictnessPolicy.load(args.policy)
        extra[f"policy:{pol.label}"] = pol
    records, label = _evaluate(args, out)
    report = build_report(records, policies, extra=extra)
    data = {"data": args.data, "guard": label, **report.as_dict()}
    if not args.from_verdicts:
        data["verdicts"] = str(out)
    if args.report:
        Path(args.report).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"flexguard eval: {args.data} ({label})")
        print(format_report(report))
        if not args.from_verdicts:
            print(f"\nverdicts saved to {out} (re-analyse with: flexguard eval {out} --from-verdicts)")
    return EXIT_PARTIAL if report.errors else EXIT_OK


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, format_calibration, parse_target, split_records, write_policies
    from .plots import PLOTS_HINT, matplotlib_available, save_plots

    target = parse_target(args.target)  # fail before any check is made
    out_dir = Path(args.out_dir)
    verdicts = Path(args.verdicts) if args.verdicts else out_dir / "verdicts.jsonl"
    records, label = _evaluate(args, verdicts)
    val, test = split_records(records, args.val_fraction, seed=args.seed)
    if not val:
        from ..errors import ConfigurationError

        raise ConfigurationError("the validation split is empty; raise --val-fraction or check the split column")
    results = calibrate(
        val,
        target,
        test=test,
        strictness=tuple(args.strictness or ("strict", "moderate", "loose")),
        min_support=args.min_support,
        per_category=not args.no_per_category,
    )
    paths = write_policies(results, out_dir, source=f"{args.data} ({label})")
    print(f"flexguard calibrate: {args.data} ({label}); target {target}; {len(val)} validation / "
          f"{len(test)} test rows")  # fmt: skip
    print(format_calibration(results))
    errors = sum(1 for r in records if not r.ok)
    if errors:
        print(f"guard errors: {errors} rows (left out of the choice; counted as flagged in the metrics)")
    print("wrote: " + ", ".join(str(p) for p in paths))
    if args.no_plots:
        print("plots: skipped (--no-plots)")
    elif not matplotlib_available():
        print(f"plots: skipped ({PLOTS_HINT})")
    else:
        pngs = save_plots(val, results, out_dir)
        print("plots: " + ", ".join(str(p) for p in pngs))
    # a target that could not be measured (no positives for recall...) is not met: the preset is kept
    return EXIT_OK if not errors and all(r.base is not None and r.base.met for r in results) else EXIT_PARTIAL


def _moderate(args: argparse.Namespace) -> int:
    from ..cli import _NO_ENDPOINT
    from ..errors import ConfigurationError
    from .moderate import moderate_file

    guard = _guard(args)
    if guard is None:
        raise ConfigurationError(_NO_ENDPOINT.removeprefix("flexguard: "))
    with guard:
        summary = moderate_file(
            guard,
            args.input,
            args.output,
            columns=_columns(args),
            surface=args.surface,
            concurrency=args.concurrency,
            resume=args.resume,
            overwrite=args.overwrite,
            retry_errors=args.retry_errors,
            limit=args.limit,
            progress=not args.no_progress,
        )
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(summary.format())
    return EXIT_PARTIAL if summary.errors else EXIT_OK
