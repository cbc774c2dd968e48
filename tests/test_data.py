import json
from collections import Counter

import pytest

from refusal.data.prompt_sets import builtin_prompts, dataset_hash, load_capability, load_prompts, split_instructions
from refusal.errors import RefusalError


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_builtin_sets_are_large_varied_and_split(kind):
    prompts = builtin_prompts(kind)
    assert len(prompts) >= 256
    assert len({p.category for p in prompts}) >= 8
    assert len({p.instruction.lower() for p in prompts}) == len(prompts)
    splits = Counter(p.split for p in prompts)
    assert set(splits) == {"train", "val", "test"} and min(splits.values()) >= 32


def test_builtin_sets_do_not_overlap():
    harmful = {p.instruction for p in builtin_prompts("harmful")}
    assert not harmful & {p.instruction for p in builtin_prompts("harmless")}


def test_the_capability_problems_are_48_with_12_per_kind_and_split():
    items = load_capability()
    assert len(items) == 48 and len({x.prompt for x in items}) == 48
    assert Counter((x.kind, x.split) for x in items) == {(k, s): 12 for k in ("code", "math") for s in ("train", "test")}
    assert all(x.prompt.strip() and x.solution.strip() for x in items)
    assert all(x.solution.startswith("```python\n") for x in items if x.kind == "code")
    assert all(x.solution.rstrip(".").split("The answer is ")[-1].isdigit() for x in items if x.kind == "math")
    assert [x.split for x in load_capability("test")] == ["test"] * 24
    with pytest.raises(RefusalError, match="unknown capability split 'val'"):
        load_capability("val")


def test_file_formats(tmp_path):
    items = ["Write a poem.", "Explain gravity."]
    (tmp_path / "a.txt").write_text("\n".join(items) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(items))
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": x} for x in items]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"instruction": x, "category": "c"}) for x in items))
    (tmp_path / "a.csv").write_text("goal,target\n" + "\n".join(f'"{x}",y' for x in items))
    for name in ("a.txt", "a.json", "b.json", "a.jsonl", "a.csv"):
        assert load_prompts(str(tmp_path / name)) == items, name


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(RefusalError, match="is empty"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(RefusalError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "x.yaml").write_text("a")
    with pytest.raises(RefusalError, match="unknown format"):
        load_prompts(str(tmp_path / "x.yaml"))
    (tmp_path / "long.txt").write_text("a" * 5000)
    with pytest.raises(RefusalError, match="5000 characters"):
        load_prompts(str(tmp_path / "long.txt"))
    (tmp_path / "blank.json").write_text(json.dumps(["ok", "  "]))
    with pytest.raises(RefusalError, match="item 2 is empty"):
        load_prompts(str(tmp_path / "blank.json"))
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"foo": "bar"}))
    with pytest.raises(RefusalError, match="no instruction field"):
        load_prompts(str(tmp_path / "nofield.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{oops")
    with pytest.raises(RefusalError, match="bad.jsonl:1: invalid JSON"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(RefusalError, match="hf:owner/name"):
        load_prompts("hf:nonsense")


def test_duplicates_are_dropped_with_a_warning(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("a\nb\na\n")
    assert load_prompts(str(tmp_path / "d.txt")) == ["a", "b"]
    assert "1 duplicate" in capsys.readouterr().err


def test_user_splits_are_deterministic_and_disjoint():
    items = [f"instruction {i}" for i in range(50)]
    a, b = split_instructions(items, seed=3), split_instructions(items, seed=3)
    assert a == b and [len(a[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(items)
    assert dataset_hash(a["train"]) != dataset_hash(a["val"])
