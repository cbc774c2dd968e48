"""``refusal search`` as a library function: the study, its confirmation and choice, the export, the report.

1. start: validate, load, open the run directory; candidates (reused while fresh)
2. the protected prompts' activations (RUN/protection.safetensors) that trials clean their directions
   against; the study in RUN/search.journal: resumed while its fingerprint (model, prompts, the settings
   that change a trial's values, the protection) is unchanged, started afresh otherwise
3. the front confirmed by generation, the default choice (search.choose)      -> RUN/search.json
4. the choice exported (fidelity-checked) and evaluated on the test split      -> RUN/model, RUN/report
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from ..common.progress import log
from ..common.provenance import timestamp
from ..common.study_url import check_database
from ..direction.cleaning import Protection
from ..edit.edits import Editor, EditParams
from ..engines.factory import make_engine
from ..engines.hf import Engine
from ..measure.judges import judge_refusals, refusal_phrases
from ..residual.directions import Candidates
from ..run.artifacts import ARTIFACTS
from ..run.files import write_json
from ..run.workspace import Context, start
from ..search.choice import bisect_front, choose, confirm_point, confirmation, held_out_refusals
from ..search.second_direction import second_trials
from ..search.trials import Objectives, pareto_front, run_trials
from ..settings import Settings
from .run import candidates, export, paper_edit, trial_edit


@dataclass
class SearchResult:
    path: Path
    search: dict  # the content of search.json
    report: dict | None

    def summary(self) -> dict:
        out: dict = {"run": str(self.path), "search": {"chosen": self.search["chosen"], "front": self.search["front"]}}
        if self.report is not None:
            out["refusal_rates"], out["kl"] = self.report["rates"], self.report.get("kl")
        return out


def study(ctx: Context, cands: Candidates) -> dict:
    """Trials (resumed while fresh), confirmation and choice -> search.json; returns its content."""
    paper, paper_note = paper_edit(ctx, cands)
    # the protection (when the search cleans its directions) is an upstream artifact, made first;
    # recorded before the first trial (a resumable artifact): an interrupted study resumes under this fingerprint
    with closing(make_engine(ctx.chat, ctx.settings, None, "original outputs")) as engine:  # no path: trials edit in place
        return ctx.get(
            "search", make=lambda _, upstream, fingerprint: trials(ctx, cands, paper, paper_note, upstream.get("protection"), fingerprint, engine)
        )


def trials(ctx: Context, cands: Candidates, paper: EditParams, paper_note: str, cleaner: Protection | None, fingerprint: str, engine: Engine) -> dict:
    """The study's trials (resumed from its journal), its front confirmed by generation, the choice -> search.json;
    ``engine`` generates the original outputs and the confirmation of edits applied in place."""
    s, run = ctx.settings, ctx.run
    timings: dict = {}
    harmful, harmless = ctx.prompts.get("harmful", "val"), ctx.prompts.get("harmless", "val")
    phrases = refusal_phrases(s.evaluation.refusal_phrases)
    refusal_ids = ctx.chat.refusal_token_ids(s.evaluation.refusal_tokens)

    begin = time.perf_counter()
    n = s.search.score_prompts
    objectives = Objectives(ctx.chat, engine, harmful[:n], harmless[:n], refusal_ids, s.search)
    timings["cache_original"] = round(time.perf_counter() - begin, 2)

    def progress(number: int, values: dict) -> None:
        log(f"trial {number:3d}: refusal {values['refusal']:7.3f}  KL {values['kl']:.4f}  (multi-token {values['kl_multi']:.4f})")

    begin = time.perf_counter()
    harmful_train = ctx.prompts.get("harmful", "train")
    harmless_train = ctx.prompts.get("harmless", "train")
    directions_cache: dict = {}  # the second direction's, found once per base

    def second(done: list[dict]) -> list:
        return second_trials(
            ctx.chat, cands, cleaner, done, s.search, harmful_train, refusal_ids, s.evaluation.batch_size, directions_cache, harmless_train
        )

    storage, name = str(run.file("search", 1)), "refusal-search"  # the run's journal, or a database shared by workers:
    if s.search.storage:  # the study's name is the search's fingerprint, so workers with the same inputs meet in it
        storage, name = s.search.storage, "refusal-search-" + fingerprint[:16]
    records = run_trials(ctx.chat, cands, objectives, s.search, s.data.seed, storage, paper, progress, cleaner, second, name)
    timings["trials"] = round(time.perf_counter() - begin, 2)
    begin = time.perf_counter()
    front = pareto_front(records)
    harmless_original = sum(judge_refusals(engine, harmless, s.evaluation.max_new_tokens, phrases).refused)
    with Editor(ctx.chat) as editor:
        prompts = {"harmful": harmful, "harmless": harmless}
        use_screen = s.search.confirm_train and harmful_train  # no train prompts (a small custom dataset): generation alone
        screen = held_out_refusals(ctx.chat, harmful_train, refusal_ids, s.evaluation.batch_size, s.search.screen_margin) if use_screen else None
        tokens, max_refused = s.evaluation.max_new_tokens, s.search.max_refused
        confirm = lambda point: confirm_point(editor, engine, cands, point, prompts, tokens, phrases, cleaner, screen, max_refused)
        confirmed = bisect_front(front, s.search, confirm, harmless_original)
    chosen, rule = choose(confirmed, s.search, harmless_original)
    did = confirmation(confirmed, s.search, harmless_original)  # which points were screened, generated on, met the target
    timings["confirm"] = round(time.perf_counter() - begin, 2)
    paper_trial = next((r["trial"] for r in records if r["role"] == "paper"), None)
    result = {
        "format_version": ARTIFACTS["search"].format_version,
        "created": timestamp(),
        "settings": s.to_dict()["search"],
        "objectives": {
            "refusal": f"mean over harmful val prompts of the max refusal {s.search.refusal_measure} over the first "
            f"{s.search.refusal_positions} response positions (teacher-forced), each at least {s.search.floor}",
            "kl": "first-token KL on harmless val prompts",
            "kl_multi": f"KL averaged over {s.search.search_kl_tokens} tokens",
        },
        "paper_trial": {"trial": paper_trial, "what": paper_note},
        "harmless_original_refused": harmless_original,
        "n_val": {"harmful": len(harmful), "harmless": len(harmless)},
        "n_scored": {"harmful": len(harmful[:n]), "harmless": len(harmless[:n])},
        "trials": records,
        "front": [p["trial"] for p in front],
        "confirmed": confirmed,
        "chosen": {"trial": chosen["trial"], "confirmed": chosen["trial"] in did["met_target"], "rule": rule, "confirmation": did},
        "timings": timings,
    }
    write_json(run.file("search"), result)
    for stage_name, seconds in timings.items():
        run.record_time(f"search_{stage_name}", seconds)
    return result


def search_summary(result: dict) -> dict:
    """The part of search.json the report shows: every trial's objectives, the front, the confirmations."""
    return {
        "trials": [{k: t[k] for k in ("trial", "refusal", "kl", "kl_multi")} for t in result["trials"]],
        "front": result["front"],
        "chosen": result["chosen"],
        "paper_trial": result["paper_trial"],
        "confirmed": [{"trial": p["trial"], "refusal": p["refusal"], "kl": p["kl"], **p["confirmed"]} for p in result["confirmed"]],
    }


def search(settings: Settings, out: Path, overwrite: bool = False, export_model_dir: bool = True) -> SearchResult:
    """``refusal search``: study, confirmation, choice; then the choice exported to RUN/model and evaluated."""
    from .evaluate import evaluate_run

    begin = time.perf_counter()
    if settings.search.storage is not None:
        check_database(settings.search.storage)  # a corrupt file or an unreachable server: before any work
    ctx = start(settings, out, overwrite, export_to=Path(out) / "model" if export_model_dir else None, inherit=("selection", "harden"))
    cands = candidates(ctx)
    result = study(ctx, cands)
    report = None
    if export_model_dir:
        edit, extra = trial_edit(ctx, cands, result["chosen"]["trial"], result)
        export(ctx, edit, ctx.run.file("model"), "search", extra=extra, reuse=True)
        report = evaluate_run(ctx, cands, None, None, edited=True, search=search_summary(result))
    ctx.timed("total", begin)
    return SearchResult(ctx.run.path, result, report)
