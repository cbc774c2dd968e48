"""`refusal audit`'s command line: the run's, search's and attack's options in one parser, and the call.

The search and the attack both have a time budget: the search's keeps ``--time-budget``, the attack's is
``--attack-time-budget``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from ..common.parsing import duration, word_list
from ..settings import AttackSettings
from .options import add_arguments, from_args, optional
from .printing import print_audit


def add_audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="how brittle the model's refusal is: run, search, attack, monitor -> RUN/audit.json and the report",
        description="--time-budget is the search's; the attack's is --attack-time-budget. Every stage is reused while fresh.",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (new, or a run to resume: every stage is reused while fresh)")
    p.add_argument("--overwrite", action="store_true", help="start the run directory again")
    p.add_argument(
        "--skip",
        type=word_list,
        action="extend",
        default=[],
        metavar="STAGES",
        help="stages to leave out, comma-separated: search, attack, monitor (their parts are null in audit.json)",
    )
    attack_settings = tuple(f"attack.{f.name}" for f in fields(AttackSettings) if f.name != "time_budget")
    add_arguments(p, ("model", "data", "selection", "evaluation", "search", *attack_settings))
    p.add_argument(
        "--attack-time-budget",
        dest="attack.time_budget",
        type=optional(duration),
        default=None,
        help=f"the attack's --time-budget: stop starting steps after this long in total; 'none': no limit (default: {AttackSettings().time_budget})",
    )


def cmd_audit(args: argparse.Namespace) -> dict:
    from ..commands.audit import audit

    result = audit(from_args(args), args.out, skip=args.skip, overwrite=args.overwrite)
    if not args.quiet and not args.json:
        print_audit(result.audit)
    return result.summary()
