"""A search spread over workers: one Optuna study in a database, several processes running its trials."""

import json
import subprocess
import sys

import pytest

from conftest import organism_args
from refusal.errors import RefusalError
from refusal.settings import SearchSettings


@pytest.mark.slow  # two worker processes, each importing torch and loading the organism (12-28 s); CI runs it
def test_two_workers_finish_the_requested_trials_of_one_sqlite_study(organism_dir, tmp_path):
    import optuna

    db = f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "refusal", "search", *organism_args(organism_dir), "--storage", db, "--trials", "14"]
    command += ["--refine", "0", "--second", "0", "--time-budget", "none", "--confirm", "1", "--n-val", "8", "--no-export", "--quiet"]
    workers = [subprocess.Popen([*command, "--out", str(tmp_path / f"worker{k}")], stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    for worker in workers:
        _, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-2000:]
    (summary,) = optuna.get_all_study_summaries(db)
    study = optuna.load_study(study_name=summary.study_name, storage=db)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 14  # none lost, none extra
    roles = [t.user_attrs.get("role", "sampled") for t in done]
    assert roles.count("paper") == 1 and roles.count("anchor") == len(SearchSettings().anchors)  # enqueued once, run once
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers ran trials
    sampled = [json.dumps(t.params, sort_keys=True) for t in done if t.user_attrs.get("role", "sampled") == "sampled"]
    assert len(set(sampled)) == len(sampled)  # each worker draws its own points: none repeated
    results = [json.loads((tmp_path / f"worker{k}" / "search.json").read_text()) for k in (0, 1)]
    assert [t["trial"] for t in results[0]["trials"]] == [t["trial"] for t in results[1]["trials"]] == [t.number for t in done]
    assert not (tmp_path / "worker0" / "search.journal").exists()  # the study is in the database


def test_bad_storage_urls_are_clear_errors(tmp_path):
    for url, message in (("study.db", "not a database URL"), (f"sqlite:///{tmp_path}/missing/study.db", "does not exist")):
        with pytest.raises(RefusalError, match=message):
            SearchSettings(storage=url).validate()
