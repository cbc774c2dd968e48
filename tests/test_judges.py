"""Judges: the substring refusal judge on fixed strings, and the LLM safety judge's mechanics on a tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model
from refusal.errors import RefusalError
from refusal.measure.judges import (
    PROMPT_FORMATS,
    REFUSAL_PHRASES,
    ChatClassifierJudge,
    Judged,
    SafetyJudge,
    format_judge_prompt,
    is_refusal,
    judge_refusals,
    load_phrases,
    load_safety_judge,
    refusal_decided,
    refusal_rate,
    unsafe_rate,
)
from refusal.model.chat import wrap_model

# ---- substring refusal judge -----------------------------------------------------------------
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "As an AI language model, I have no opinions.",
    "I cannot provide instructions for this.",
    "Unfortunately, I am not able to do that.",
    "That request is illegal and unethical.",
    "I can’t do that (curly apostrophe).",
]
ANSWERS = [
    "Sure, here is a recipe for bread: mix flour, water, salt and yeast.",
    "The capital of France is Paris.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_matching_ignores_case_and_position():
    assert is_refusal("i'M sOrRy, no.")
    assert is_refusal("Here is the thing. AS AN AI, I do not browse.")
    assert refusal_rate(REFUSALS + ANSWERS) == (len(REFUSALS), len(REFUSALS) + len(ANSWERS))


def test_custom_phrases_replace_the_defaults():
    phrases = ("no way", "Nope")
    assert refusal_rate(["NO WAY am I doing that", "nope.", "I'm sorry, no."], phrases=phrases) == (2, 3)
    assert is_refusal("I'm sorry", REFUSAL_PHRASES) and not is_refusal("I'm sorry", phrases)
    assert not is_refusal("anything at all", ())


def test_refusal_decided_on_prefixes_agrees_with_the_full_completion():
    full = "Let me think. I'm sorry, but I cannot help with that request."
    decided = [refusal_decided(full[:n], REFUSAL_PHRASES) for n in range(len(full) + 1)]
    first = decided.index(True)
    assert full[:first].endswith("I'm sorry")
    assert all(decided[first:]) and not any(decided[:first])  # once decided, stays decided
    assert decided[-1] == is_refusal(full)
    assert not refusal_decided("Sure, here is how to bake bread", REFUSAL_PHRASES)


class ScriptedEngine:
    """An Engine with fixed completions (one token per character), recording the stop rule it was given."""

    def __init__(self, texts: list[str]):
        self.texts, self.stops = texts, []

    def generate_ids(self, instructions, max_new_tokens, stop_when=None):
        self.stops.append(stop_when)
        return [[ord(c) for c in text[:max_new_tokens]] for text in self.texts[: len(instructions)]]

    def decode(self, ids):
        return ["".join(map(chr, row)) for row in ids]

    def generate(self, instructions, max_new_tokens, stop_when=None):
        return self.decode(self.generate_ids(instructions, max_new_tokens, stop_when))


def test_judge_refusals_generates_with_any_engine_then_judges_each_completion():
    texts = [REFUSALS[0], ANSWERS[0], "I CANNOT do it."]
    engine = ScriptedEngine(texts)
    judged = judge_refusals(engine, ["a", "b", "c"], 200)
    assert judged == Judged(texts, [[ord(c) for c in t] for t in texts], [True, False, True]) and judged.count == (2, 3)
    stop = engine.stops[-1]
    assert stop is not None and stop("so: I'm sorry") and not stop("Sure")  # early stop at a refusal phrase
    assert judge_refusals(engine, ["a", "b", "c"], 200, phrases=["Sure"], full=True).refused == [False, True, False]
    assert engine.stops[-1] is None  # full completions: no early stop
    assert judge_refusals(engine, ["a"], 4).texts == [texts[0][:4]]


def test_load_phrases_skips_comments_blanks_and_duplicates(tmp_path):
    path = tmp_path / "phrases.txt"
    path.write_text("# refusal phrases\n\nno way\n  not today  \n# another comment\nno way\nI decline\n", encoding="utf-8")
    phrases = load_phrases(path)
    assert phrases == ("no way", "not today", "I decline")
    assert refusal_rate(["Not today, friend.", "Sure!"], phrases=phrases) == (1, 2)


def test_load_phrases_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(RefusalError, match=r"missing\.txt does not exist; give a text file with one phrase per line"):
        load_phrases(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n", encoding="utf-8")
    with pytest.raises(RefusalError, match=r"empty\.txt has no phrases .*add one phrase per line"):
        load_phrases(str(empty))


# ---- prompt formats (pure strings) -------------------------------------------------------------
def test_llama_guard_3_prompt_structure():
    prompt = format_judge_prompt("llama-guard-3", "  How do I bake bread?\n", "Mix flour and water.\n\n")
    assert prompt.startswith("<|start_header_id|>user<|end_header_id|>\n\nTask: ")
    assert "'safe' or 'unsafe'" in prompt and "ONLY THE LAST Agent message" in prompt
    categories = prompt.split("<BEGIN UNSAFE CONTENT CATEGORIES>\n")[1].split("<END UNSAFE CONTENT CATEGORIES>")[0]
    lines = categories.strip().splitlines()
    assert len(lines) == 14 and lines[0] == "S1: Violent Crimes." and lines[-1] == "S14: Code Interpreter Abuse."
    assert [line.split(":")[0] for line in lines] == [f"S{i}" for i in range(1, 15)]
    assert "<BEGIN CONVERSATION>\n\nUser: How do I bake bread?\n\nAgent: Mix flour and water.\n\n<END CONVERSATION>" in prompt
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "{" not in prompt
    assert PROMPT_FORMATS["llama-guard-3"][1:] == ("unsafe", "safe")


def test_harmbench_prompt_structure():
    prompt = format_judge_prompt("harmbench", "Write a poem", "Roses are red.")
    assert prompt.startswith("[INST] <<SYS>>\n") and "\n<</SYS>>\n\n" in prompt
    assert "Behavior:\nWrite a poem\n\nGeneration:\nRoses are red.\n\n---\nRules:\n" in prompt
    assert prompt.endswith("\n\nAnswer: [/INST]")
    assert prompt.count("\n- ") == 4
    assert PROMPT_FORMATS["harmbench"][1:] == ("Yes", "No")


def test_custom_format_is_filled_in_one_pass():
    fmt = "Q: {instruction} A: {completion} {json}"
    assert format_judge_prompt(fmt, "say {completion}", "ok") == "Q: say {completion} A: ok {json}"


# ---- LLM safety judge on a tiny model ------------------------------------------------------------
FORMAT = "user : {instruction} assistant : {completion} . good or bad ?"
INSTRUCTIONS = ["Sure", "I cannot help with that", "help", "Sure here is that", "I", "cannot", "with that help"]
COMPLETIONS = ["Sure here is", "Sorry", "I cannot", "help", "Sure Sure Sure here is that help with", "is", "As"]


@pytest.fixture
def judge(tokenizer):
    chat = wrap_model(build_model("llama", len(tokenizer)), tokenizer, source="tiny-judge")
    return ChatClassifierJudge(chat, FORMAT, batch_size=3, unsafe_token="bad", safe_token="good")


def _bias(judge, word: str, value: float) -> None:
    head = judge.chat.model.lm_head
    bias = torch.zeros(head.out_features)
    bias[judge.chat.tokenizer.convert_tokens_to_ids(word)] = value
    head.bias = torch.nn.Parameter(bias)


def test_judge_verdict_follows_the_verdict_token_logits(judge):
    _bias(judge, "bad", 50.0)
    assert judge.unsafe(INSTRUCTIONS, COMPLETIONS) == [True] * len(INSTRUCTIONS)
    assert unsafe_rate(judge, INSTRUCTIONS, COMPLETIONS) == (len(INSTRUCTIONS), len(INSTRUCTIONS))
    _bias(judge, "good", 50.0)
    assert judge.unsafe(INSTRUCTIONS, COMPLETIONS) == [False] * len(INSTRUCTIONS)
    assert unsafe_rate(judge, INSTRUCTIONS, COMPLETIONS) == (0, len(INSTRUCTIONS))


def test_judge_margin_is_the_logit_gap_on_the_formatted_prompt(judge):
    tok, model = judge.chat.tokenizer, judge.chat.model
    ids = tok(format_judge_prompt(FORMAT, INSTRUCTIONS[1], COMPLETIONS[1]))["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    expected = (logits[tok.convert_tokens_to_ids("bad")] - logits[tok.convert_tokens_to_ids("good")]).item()
    assert judge.margins(INSTRUCTIONS[1:2], COMPLETIONS[1:2])[0] == pytest.approx(expected, abs=1e-4)


def test_batched_judging_equals_one_by_one(judge):
    lengths = {len(judge.chat.tokenizer(format_judge_prompt(FORMAT, i, c))["input_ids"]) for i, c in zip(INSTRUCTIONS, COMPLETIONS)}
    assert len(lengths) > 3  # batches really need left padding
    batched = judge.margins(INSTRUCTIONS, COMPLETIONS)
    single = [judge.margins([i], [c])[0] for i, c in zip(INSTRUCTIONS, COMPLETIONS)]
    assert batched == pytest.approx(single, abs=1e-4)
    assert len({round(m, 3) for m in single}) > 1  # the margins depend on the text
    assert judge.unsafe(INSTRUCTIONS, COMPLETIONS) == [m > 0 for m in single]


def test_judge_satisfies_the_protocol_and_rates_any_judge(judge):
    assert isinstance(judge, SafetyJudge) and judge.name == "tiny-judge (custom format)"

    class Keyword:
        name = "keyword"

        def unsafe(self, instructions, completions):
            return ["bomb" in c for c in completions]

    assert unsafe_rate(Keyword(), ["a", "b", "c"], ["a bomb", "bread", "bomb"]) == (2, 3)
    with pytest.raises(RefusalError, match="2 instructions but 1 completions"):
        judge.unsafe(["a", "b"], ["c"])


def test_judge_validates_format_and_verdict_words(tokenizer):
    chat = wrap_model(build_model("llama", len(tokenizer)), tokenizer, source="tiny-judge")
    with pytest.raises(RefusalError, match=r"unknown judge prompt format 'llama-guard-2'; choose one of llama-guard-3, harmbench"):
        ChatClassifierJudge(chat, "llama-guard-2")
    with pytest.raises(RefusalError, match=r"needs its verdict words; pass unsafe_token=\.\.\. and safe_token=\.\.\."):
        ChatClassifierJudge(chat, FORMAT)
    with pytest.raises(
        RefusalError,
        match=r"verdict word 'bad good' is 2 tokens \['bad', 'good'\] of the judge's tokenizer \(tiny-judge\); give a word that is exactly one token",
    ):
        ChatClassifierJudge(chat, FORMAT, unsafe_token="bad good", safe_token="good")
    # The tiny vocabulary has "safe" but not "unsafe": Llama Guard 3's verdict word is refused up front.
    with pytest.raises(RefusalError, match=r"verdict word 'unsafe' is not in the vocabulary of the judge's tokenizer"):
        ChatClassifierJudge(chat, "llama-guard-3")
    with pytest.raises(RefusalError, match="same token"):
        ChatClassifierJudge(chat, FORMAT, unsafe_token="good", safe_token="good")
    with pytest.raises(RefusalError, match="batch_size 0"):
        ChatClassifierJudge(chat, FORMAT, batch_size=0, unsafe_token="bad", safe_token="good")


def test_load_safety_judge_from_a_local_checkpoint(tmp_path, tokenizer):
    model = build_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    with pytest.raises(RefusalError, match="unknown judge prompt format"):  # checked before anything loads
        load_safety_judge(str(tmp_path / "absent"), "nope")
    judge = load_safety_judge(str(tmp_path / "judge"), FORMAT, unsafe_token="bad", safe_token="good", batch_size=4)
    assert judge.name == f"{tmp_path / 'judge'} (custom format)"
    reference = ChatClassifierJudge(wrap_model(model, tokenizer), FORMAT, unsafe_token="bad", safe_token="good")
    assert judge.margins(INSTRUCTIONS, COMPLETIONS) == pytest.approx(reference.margins(INSTRUCTIONS, COMPLETIONS), abs=1e-4)
