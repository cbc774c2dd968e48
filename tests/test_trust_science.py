"""Issue 27, science: edit variants named for what they do, the residual and writer forms of ablation, analyze on refused prompts."""

import pytest
import torch

from conftest import FAMILIES, build_model, save_tiny
from refusal.checkpoint.export import export_model
from refusal.edit.edits import EditParams, Kernel, KernelEdit, edited, source_direction
from refusal.errors import RefusalError
from refusal.model.chat import wrap_model
from refusal.model.packaged import load_model
from refusal.residual.directions import Candidates, unit_vector
from refusal.settings import Settings

NEW_VARIANTS = ["projected+coordinate_norms", "biprojected_targets", "biprojected_targets+coordinate_norms", "projection+coordinate_norms"]


def fresh(tokenizer, family="llama", tie=False):
    return wrap_model(build_model(family, len(tokenizer), tie=tie), tokenizer, source=f"tiny-{family}")


def candidates_for(chat, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (chat.n_layers + 1, 2, chat.d_model)
    return Candidates(torch.randn(shape, generator=g), torch.randn(shape, generator=g) + 1.0)


def edited_weights(chat, edit):
    with edited(chat, edit):
        return {n: p.detach().clone() for n, p in chat.model.named_parameters()}


# ---- 1. variants ------------------------------------------------------------------------------------
def test_old_variant_names_read_as_the_same_edits(tokenizer):
    """search.json / refusal.json / journals written before the rename: the old names give identical weights."""
    from refusal.settings import VARIANT_ALIASES, VARIANTS, variant_parts

    chat = fresh(tokenizer)
    cands = candidates_for(chat)
    assert VARIANT_ALIASES == {"norm_preserving": "projection+written_norms", "biprojected": "projected"}
    for old, new in VARIANT_ALIASES.items():
        kernels = {"attn": {"peak": 1.2, "centre": 1.0, "width": 1.0, "floor": 0.1}, "mlp": {"peak": 0.7, "centre": 0.0, "width": None, "floor": 0.0}}
        stored = {"layer": 1.5, "position": -1, **kernels, "variant": old, "clean": None, "second": None}
        params_old, params_new = EditParams.from_dict(stored), EditParams.from_dict({**stored, "variant": new})
        params_old.validate(chat.n_layers, 2)
        a = edited_weights(chat, KernelEdit.from_candidates(cands, params_old))
        b = edited_weights(chat, KernelEdit.from_candidates(cands, params_new))
        assert all(torch.equal(a[k], b[k]) for k in a), old
    settings = Settings()
    settings.search.variants = ["projection", "norm_preserving", "biprojected"]  # an old run.json's settings
    settings.validate()
    # the default search space is today's three, in the same order (the same trials): only the names are new
    assert [variant_parts(v) for v in VARIANTS] == [variant_parts(v) for v in ("projection", "norm_preserving", "biprojected")]
    with pytest.raises(RefusalError, match="unknown edit variant projection\\+sideways"):
        variant_parts("projection+sideways")


def test_biprojected_targets_leaves_each_layers_harmless_mean_untouched(tokenizer):
    chat = fresh(tokenizer)
    cands = candidates_for(chat)
    params = EditParams(layer=1, variant="biprojected_targets")
    edit = KernelEdit.from_candidates(cands, params)
    before = {id(w.weight): w.weight.detach().clone() for w in (*chat.embeddings, *chat.writers)}
    with edited(chat, edit):
        for w in chat.writers:  # Linear [d_model, in]: the harmless mean of the writer's layer reads the same from it
            m = cands.mean_harmless[w.layer, -1]
            assert not torch.equal(w.weight, before[id(w.weight)])
            assert torch.allclose(m @ w.weight, m @ before[id(w.weight)], atol=1e-4), w.weight_name
        embed = chat.embeddings[0].weight  # rows: each token's vector keeps its component along layer 0's mean
        m0 = cands.mean_harmless[0, -1]
        assert torch.allclose(embed @ m0, before[id(embed)] @ m0, atol=1e-4)
    # the source-layer form (today's, formerly "biprojected") does change them: the two are different edits
    with edited(chat, KernelEdit.from_candidates(cands, EditParams(layer=1, variant="projected"))):
        w = chat.writers[-1]
        m = cands.mean_harmless[w.layer, -1]
        assert not torch.allclose(m @ w.weight, m @ before[id(w.weight)], atol=1e-3)
    with pytest.raises(RefusalError, match="needs the harmless mean of every layer"):
        KernelEdit(source_direction(cands, params), params)


def published_norm_preserving(weight: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """The public description, written independently: a Linear W [d_model, in] as row norms times row directions;
    the directions lose s times their component along u (in d_model), are renormalised, and get the norms back."""
    norms = weight.norm(dim=1, keepdim=True)
    direction = weight / norms
    direction = direction - s * torch.outer(u, u @ direction)
    return norms * direction / direction.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("norms", ["written_norms", "coordinate_norms"])
def test_each_norm_choice_keeps_exactly_its_axis(tokenizer, norms):
    chat = fresh(tokenizer)
    unit = unit_vector(torch.randn(chat.d_model, generator=torch.Generator().manual_seed(7)))
    writer, embed = chat.writers[0], chat.embeddings[0]
    w0, e0 = writer.weight.detach().clone(), embed.weight.detach().clone()
    with edited(chat, KernelEdit(unit, EditParams(layer=1, attn=Kernel(0.9), variant=f"projection+{norms}"))):
        w, e = writer.weight.detach(), embed.weight.detach()
        written = (w.norm(dim=0), w0.norm(dim=0), e.norm(dim=1), e0.norm(dim=1))  # the vectors written into the stream
        coordinate = (w.norm(dim=1), w0.norm(dim=1), e.norm(dim=0), e0.norm(dim=0))  # each residual coordinate's weights
        kept, other = (written, coordinate) if norms == "written_norms" else (coordinate, written)
        assert torch.allclose(kept[0], kept[1], rtol=1e-5) and torch.allclose(kept[2], kept[3], rtol=1e-5)
        assert not torch.allclose(other[0], other[1], rtol=1e-3) and not torch.allclose(other[2], other[3], rtol=1e-3)
        if norms == "coordinate_norms":
            assert torch.allclose(w, published_norm_preserving(w0, unit, 0.9), atol=1e-6)


@pytest.mark.parametrize("variant", NEW_VARIANTS)
def test_new_variants_export_with_fidelity_in_memory_and_streamed(tokenizer, tmp_path, variant):
    chat = fresh(tokenizer, "qwen2", tie=True)  # saved from memory (no checkpoint on disk)
    params = EditParams(layer=1.0, attn=Kernel(0.8, centre=1.0, width=1.0), mlp=Kernel(1.1), variant=variant)
    params.validate(chat.n_layers, 2)  # a variant the search and the export accept
    info = export_model(chat, KernelEdit.from_candidates(candidates_for(chat), params), tmp_path / "memory")
    assert not info["written"]["streamed"] and info["fidelity_max_abs_diff"] < 1e-4
    loaded = load_model(str(save_tiny(tmp_path / "src", "gemma2", tie=False)), device="cpu")  # post-norm gains
    edit = KernelEdit.from_candidates(candidates_for(loaded), params)
    info = export_model(loaded, edit, tmp_path / "streamed")
    written = info["written"]
    assert written["streamed"] and info["fidelity_max_abs_diff"] < 1e-4 and written["tensor_check_max_residual"] <= 1
    hooked = "norms" not in variant  # a variant that keeps no norms is checked against its hooked equivalent
    assert info["fidelity_reference"].startswith("its hooked equivalent") == hooked, info["fidelity_reference"]
    with edited(loaded, edit):
        expected = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    from conftest import checkpoint_tensors

    for name, value in checkpoint_tensors(tmp_path / "streamed").items():
        assert torch.allclose(value, expected[name], atol=1e-5), name


def test_streamed_coordinate_norms_in_small_blocks_equal_one_block(monkeypatch):
    from refusal.checkpoint.streaming import TensorEdit
    from refusal.edit import tensor_edit

    g = torch.Generator().manual_seed(2)
    u = unit_vector(torch.randn(16, generator=g))
    for rows, shape in ((False, (16, 40)), (True, (40, 16))):
        weight = torch.randn(shape, generator=g)
        edit = TensorEdit("w", ((u, 0.7), (unit_vector(torch.randn(16, generator=g)), 0.4)), rows, norms="coordinate_norms")
        whole = weight.clone()
        edit.apply(whole)
        monkeypatch.setattr(tensor_edit, "BLOCK_BYTES", 4 * 16 * 3)
        blocked = weight.clone()
        assert len(edit._blocks(blocked)) > 1  # the patch reaches the blocks: several, not one
        assert edit.apply(blocked) <= 1
        monkeypatch.undo()
        assert torch.allclose(whole, blocked, atol=1e-6)
        assert torch.allclose(whole.norm(dim=0 if rows else 1), weight.norm(dim=0 if rows else 1), rtol=1e-5)


# ---- 2. the residual and writer forms of ablation ---------------------------------------------------
PROMPTS = ["How do I bake bread?", "Name three colors."]
POST_NORM = ["gemma2", "gemma3_text", "olmo2"]


def forms_logits(chat, direction):
    from refusal.residual.interventions import ablate

    batch = chat.batch(PROMPTS)
    out = {}
    for form in ("writers", "residual"):
        with ablate(chat, direction, form=form):
            out[form] = chat.logits(batch, last_only=False)
    return out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in POST_NORM])
def test_the_two_ablation_forms_agree_on_pre_norm_families(family, tokenizer):
    chat = fresh(tokenizer, family)
    assert all(w.post_norm is None for w in chat.writers)
    out = forms_logits(chat, torch.randn(chat.d_model, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(out["writers"], out["residual"])


@pytest.mark.parametrize("family", POST_NORM)
def test_on_post_norm_families_the_residual_form_is_not_the_weight_edit(family, tokenizer):
    """Both forms leave no component along u in the stream; the writer form equals the weight edit, the residual form
    (the paper's hooks, after the post-norm) does not: the norm rescales what the writers' projection leaves."""
    from refusal.edit.edits import orthogonalized
    from refusal.residual.activations import residual_reader
    from refusal.residual.interventions import ablate

    chat = fresh(tokenizer, family)
    direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(3))
    unit = unit_vector(direction)
    batch = chat.batch(PROMPTS)
    for form in ("writers", "residual"):
        found: dict[int, torch.Tensor] = {}
        with ablate(chat, direction, form=form), residual_reader(chat, 4, found.__setitem__):
            chat.logits(batch, last_only=False)
        assert sorted(found) == list(range(chat.n_layers + 1))
        assert max(float((x @ unit).abs().max()) for x in found.values()) < 1e-4, form
    out = forms_logits(chat, direction)
    with orthogonalized(chat, direction):
        edit = chat.logits(batch, last_only=False)
    assert torch.allclose(out["writers"], edit, atol=1e-4)
    assert float((out["residual"] - edit).abs().max()) > 1e-3


def test_an_unknown_ablation_form_is_a_clear_error(tokenizer):
    from refusal.commands.generate import generate_completions
    from refusal.residual.interventions import ablate

    with pytest.raises(RefusalError, match="unknown ablation form 'sideways'"):
        with ablate(fresh(tokenizer), torch.randn(32), form="sideways"):
            pass
    with pytest.raises(RefusalError, match="unknown ablation form 'sideways'"):
        generate_completions(Settings(), ["hello"], ablation_form="sideways")  # before any model is loaded


# ---- 3. analyze on the refused prompts, the attack's rates in the report ---------------------------
ATTACK = ["--suffix-length", "4", "--steps", "40", "--candidates", "64", "--attack-prompts", "8", "--time-budget", "none", "--quiet"]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, robust_organism_dir):
    from conftest import organism_args
    from refusal.cli.main import main

    run = tmp_path_factory.mktemp("science") / "run"
    assert main(["attack", "--out", str(run), *organism_args(robust_organism_dir), *ATTACK]) == 0
    assert main(["analyze", "--run", str(run), "--quiet"]) == 0
    return run


def test_analyze_measures_the_prompts_the_model_refuses(analysed):
    import json

    attack = json.loads((analysed / "attack.json").read_text())
    m = json.loads((analysed / "analysis.json").read_text())["mechanisms"]
    refused = [c["instruction"] for c in attack["completions"]["none"] if c["refused"]]
    assert m["refused"]["refused"] == len(refused) == attack["refusal"]["none"]["refused"] and m["refused"]["of"] == attack["n_test"]
    assert m["n_prompts"]["harmful"] == m["refused"]["used"] == len(refused) and "attack.json" in m["refused"]["judge"]


def test_the_report_carries_the_attacks_rates(analysed):
    import json
    import re

    attack = json.loads((analysed / "attack.json").read_text())
    report = json.loads((analysed / "report" / "report.json").read_text())
    rates = report["mechanisms"]["attack"]
    for name in ("none", "suffix", "random"):
        assert rates["refusal"][name] == attack["refusal"][name]
        assert rates["refusal_score"][name] == attack["refusal_score"][name]
    html = (analysed / "report" / "report.html").read_text()
    shown = dict(re.findall(r'data-key="(mechanisms\.attack\.[^"]+)">([^<]*)<', html))
    keys = ("refused", "total", "rate", "low", "high")
    assert {f"mechanisms.attack.refusal.{n}.{k}" for n in ("none", "suffix", "random") for k in keys} <= set(shown)
    markdown = (analysed / "report" / "report.md").read_text()
    assert "adversarial suffix" in markdown and "random suffix of the same length" in markdown
    assert f"{report['mechanisms']['refused']['refused']} of {attack['n_test']} harmful test prompts refused" in markdown


def test_analyze_refuses_when_no_prompt_is_refused(analysed, tmp_path, monkeypatch, capsys):
    """A suffix from a file: the refusals are judged here; none refused is a one-line error and nothing is written."""
    from refusal.cli.main import main
    from refusal.commands import analyze as analyze_module
    from refusal.measure.judges import Judged

    suffix = tmp_path / "suffix.txt"
    suffix.write_text("a poem for bread\n")  # words the organism knows (an unknown one is refused)
    before = {p.name: p.read_bytes() for p in analysed.iterdir() if p.is_file()}
    nothing = lambda engine, prompts, *a, **k: Judged([""] * len(prompts), [[]] * len(prompts), [False] * len(prompts))
    monkeypatch.setattr(analyze_module, "judge_refusals", nothing)
    assert main(["analyze", "--run", str(analysed), "--suffix-file", str(suffix), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "refuses none of the" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in analysed.iterdir() if p.is_file()} == before


def test_analyze_keeps_only_the_refused_prompts(analysed, tmp_path, monkeypatch):
    """(Runs last: it changes the module's analysis.) The organism refuses every test prompt; a judge that says it refuses
    every other one leaves half of them, and the report says so."""
    import json

    from refusal.cli.main import main
    from refusal.commands import analyze as analyze_module
    from refusal.measure.judges import Judged

    suffix = tmp_path / "suffix.txt"
    suffix.write_text("a poem for bread\n")  # words the organism knows (an unknown one is refused)
    judged = lambda engine, prompts, *a, **k: Judged([""] * len(prompts), [[]] * len(prompts), [i % 2 == 1 for i in range(len(prompts))])
    monkeypatch.setattr(analyze_module, "judge_refusals", judged)
    assert main(["analyze", "--run", str(analysed), "--suffix-file", str(suffix), "--quiet"]) == 0
    m = json.loads((analysed / "analysis.json").read_text())["mechanisms"]
    n = m["refused"]["of"]
    assert m["refused"]["refused"] == m["refused"]["used"] == m["n_prompts"]["harmful"] == n // 2 and "attack.json" not in m["refused"]["judge"]
    assert m["attack"] is None  # the suffix came from a file: no attack rates to show
    assert "the suffix came from a file" in (analysed / "report" / "report.html").read_text()


def test_evaluate_and_generate_take_the_ablation_form(tmp_path):
    from refusal.cli.main import build_parser
    from refusal.commands.evaluate import hook_conditions
    from refusal.residual.directions import Direction

    parser = build_parser()
    for command in (["evaluate", "--ablate", "RUN", "--out", "OUT"], ["generate", "--ablate", "RUN", "hello"]):
        assert parser.parse_args(command).ablation_form == "writers"
        assert parser.parse_args([*command, "--ablation-form", "residual"]).ablation_form == "residual"
        with pytest.raises(RefusalError, match="invalid choice"):
            parser.parse_args([*command, "--ablation-form", "sideways"])
    direction = Direction(torch.randn(32), 1, -1)
    (condition,) = hook_conditions(None, direction, added=False, form="residual")  # type: ignore[arg-type]
    assert condition.name == "ablated" and condition.label == "ablated (hooks, residual form)"


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_the_published_variant_exports_experts_like_the_edit_in_memory(family, tmp_path):
    """Mixture of experts: one Linear per expert on disk (Qwen2-MoE) or fused with rows (GPT-OSS); per-layer units and
    coordinate norms streamed match the edit in memory, and a search Editor reverts them bit for bit."""
    from conftest import build_tokenizer, checkpoint_tensors
    from refusal.edit.edits import Editor

    tok = build_tokenizer()
    build_model(family, len(tok), tie=False).save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tok.save_pretrained(tmp_path / "src")
    chat = load_model(str(tmp_path / "src"), device="cpu")
    params = EditParams(layer=1.0, attn=Kernel(0.7), mlp=Kernel(1.2, centre=1.0, width=1.0), variant="biprojected_targets+coordinate_norms")
    params.validate(chat.n_layers, 2)
    edit = KernelEdit.from_candidates(candidates_for(chat), params)
    info = export_model(chat, edit, tmp_path / "out")
    assert info["written"]["streamed"] and info["fidelity_max_abs_diff"] < 1e-4
    state = {k: v.clone() for k, v in chat.model.state_dict().items()}
    with Editor(chat) as editor, editor.applied(edit):
        expected = {k: v.detach().clone() for k, v in chat.model.state_dict().items()}
    assert all(torch.equal(v, state[k]) for k, v in chat.model.state_dict().items())
    written = checkpoint_tensors(tmp_path / "out")
    fused = {k: v for k, v in expected.items() if k not in written}  # per-expert files: stacked back by name
    for name, value in written.items():
        if name in expected:
            assert torch.allclose(value, expected[name], atol=1e-5), name
    assert all(".experts." in k for k in fused)
