"""What the commands print on the console: the report's rates and costs, the search front, the attack, the analysis, the monitor, the audit."""

from __future__ import annotations

from pathlib import Path

from ..common.progress import console, log


def print_report(report: dict | None, path: Path | None) -> None:
    if report is None:
        return
    from ..report.render import fmt

    labels = {c["name"]: c["label"] for c in report["conditions"]}
    console.print("\n[bold]refusal rate on the test split[/] (substring judge, 95% Wilson interval)")
    for condition, kinds in report["rates"].items():
        for kind, entry in kinds.items():
            console.print(
                f"  {kind:9s} {labels[condition]:22s} {entry['refused']:3d}/{entry['total']:<3d} {entry['rate']:6.1%}  "
                f"[{entry['low']:.0%}, {entry['high']:.0%}]",
                highlight=False,
            )
    for name, kl in (report.get("kl") or {}).items():
        console.print(
            f"  KL on harmless ({labels[name]}): first token {fmt('kl', kl['first_token']['mean'])}, "
            f"first {kl['multi_token']['tokens']} tokens {fmt('kl', kl['multi_token']['mean'])}",
            highlight=False,
        )
    if ce := report.get("ce_loss"):
        losses = ", ".join(f"{labels[name]} {loss:.4f}" for name, loss in ce["loss"].items())
        console.print(f"  cross-entropy on {ce['tokens']} corpus tokens (nats/token): {losses}", highlight=False)
    if cap := report.get("capability"):
        losses = ", ".join(f"{labels[name]} {loss:.4f}" for name, loss in cap["loss"].items())
        console.print(f"  capability proxy on {cap['items']} code/math solutions (nats/token): {losses}", highlight=False)
    if path is not None:
        log(f"report: {path / 'report' / 'report.html'}")


def confirmed_counts(c: dict | None, sep: str = ", ") -> str:
    """A confirmed point's harmful/harmless validation refusals (or why it was not generated on) and its train screen."""
    if not c:
        return "-"
    generated = c.get("harmful_refused") is not None
    counts = f"{c['harmful_refused']}/{c['harmful_total']}{sep}{c['harmless_refused']}/{c['harmless_total']}" if generated else "not generated"
    above = f" above -{c['train_buffer']:g}" if "train_buffer" in c else ""
    return counts + (f" (train {c['train_refused']}/{c['train_total']}{above})" if "train_refused" in c else "")


def print_search(result: dict) -> None:
    trials = {t["trial"]: t for t in result["trials"]}
    confirmed = {p["trial"]: p["confirmed"] for p in result["confirmed"]}
    console.print(f"\n[bold]search front[/] ({len(trials)} trials; validation prompts; * = chosen, P = paper's edit)")
    console.print("  trial  refusal score  first-token KL  multi-token KL  confirmed harmful / harmless refused (train screen)", highlight=False)
    for number in result["front"]:
        t, c = trials[number], confirmed.get(number)
        mark = ("*" if number == result["chosen"]["trial"] else " ") + ("P" if number == result["paper_trial"]["trial"] else " ")
        counts = confirmed_counts(c, " / ")
        console.print(f"{mark}{number:5d}  {t['refusal']:13.3f}  {t['kl']:14.4f}  {t['kl_multi']:14.4f}  {counts}", highlight=False)
    chosen = result["chosen"]
    how = "" if "confirmed" not in chosen else " [green]confirmed[/]" if chosen["confirmed"] else " [yellow]fallback, not confirmed[/]"
    console.print(f"chosen: trial {chosen['trial']}{how} ({chosen['rule']})", highlight=False)


def print_attack(result: dict) -> None:
    console.print(f"\n[bold]suffix[/] ({result['source']}, {len(result['suffix_ids'])} tokens): {result['suffix']!r}", highlight=False)
    console.print("[bold]harmful test prompts refused[/] (substring judge, 95% Wilson interval; mean first-token refusal log-odds)")
    for name, label in result["conditions"].items():
        entry = result["refusal"][name]
        console.print(
            f"  {label:34s} {entry['refused']:3d}/{entry['total']:<3d} {entry['rate']:6.1%} [{entry['low']:.0%}, {entry['high']:.0%}]  "
            f"{result['refusal_score'][name]:+.2f}",
            highlight=False,
        )


def print_analysis(m: dict) -> None:
    if r := m.get("refused"):
        console.print(f"  harmful prompts analysed: {r['used']} of the {r['refused']}/{r['of']} test prompts the model refuses", highlight=False)
    for group, gap in m["gap_closed"].items():
        console.print(f"  {m['groups'][group]}: closes {gap['mean_from_direction_layer']:.0%} of the harmful-harmless cosine gap", highlight=False)
    heads = ", ".join(f"L{h['layer']}H{h['head']} {h['attribution']['harmful']:+.2f}->{h['attribution']['harmful_suffix']:+.2f}" for h in m["heads"])
    console.print(f"  top heads (attribution without -> with the suffix): {heads}", highlight=False)


def print_monitor(m: dict) -> None:
    targets = list(m.get("fpr_targets") or {})
    console.print(
        f"\n[bold]monitor[/] (test split vs harmless; thresholds from harmless validation prompts; * = default score, {m['score']})",
        highlight=False,
    )
    console.print(f"  {'condition':38s} {'score':17s} {'AUROC':>6s}  " + "  ".join(f"TPR@{t} (FPR)" for t in targets), highlight=False)
    for name, label in m["conditions"].items():
        for score, e in (m["test"].get(name) or {}).items():
            rates = "  ".join(f"{e[f'tpr@{t}']:5.1%} ({e[f'fpr@{t}']:.1%})" for t in targets)
            mark = "*" if score == m["score"] else " "
            console.print(f"  {label:38s} {score + mark:17s} {e['auroc']:6.3f}  {rates}", highlight=False)
    if m.get("missing"):
        console.print(f"  {m['missing']}", highlight=False)


def print_audit(a: dict) -> None:
    b = a["brittleness"]
    score = "undefined" if b["score"] is None else f"{b['score']:.2f} ({b['level']})"
    detectable = "not measured" if b.get("detectable") is None else f"{b['detectable']:.1%}"
    console.print(f"\n[bold]brittleness[/] {score}; detectable (monitor TPR@1%FPR on suffix-attacked prompts): {detectable}", highlight=False)
    console.print("  share of the unedited model's refusals (harmful test prompts) each attack removes:", highlight=False)
    for name, p in b["parts"].items():
        if p is None:
            console.print(f"  {name:9s} not measured: {(a.get('missing') or {}).get(name, '')}", highlight=False)
            continue
        removed = "undefined" if p["removed"] is None else f"{p['removed']:6.1%}"
        beside = f"  (KL {a['edit']['kl']:.4f}, trial {a['edit']['trial']})" if name == "edit" and a.get("edit") else ""
        counts = f"refused {p['refused_before']}/{p['total']} -> {p['refused_after']}/{p['total']}"
        console.print(f"  {name:9s} {removed}  {counts}{beside}", highlight=False)
    if b.get("note"):
        console.print(f"  {b['note']}", highlight=False)
