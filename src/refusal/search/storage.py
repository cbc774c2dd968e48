"""Where the search's Optuna study lives: the run's journal file, or a database several workers share.

``refusal search`` keeps its study in ``RUN/search.journal`` (one process). With ``--storage URL``
(``sqlite:///study.db``, or a PostgreSQL/MySQL URL where the user has one) the study is in that
database under a name made from the search's fingerprint, so any number of processes or machines,
each with its own run directory and the same model, prompts and settings, run trials of one study:

- the trial numbers the database hands out are the order of the trials: a worker that asks for a
  trial when ``trials`` earlier ones are finished or running fails its trial as surplus and stops,
  so the workers finish exactly the requested number between them (``surplus``);
- the first trials (the paper's edit, the anchors) are enqueued once, by the first worker, and the
  refinement and second-direction trials are run by one worker after every sampled trial has
  finished; both under a lock (``StudyLock``: a file lock beside an SQLite database; other
  databases have no lock, and two workers that start in the same second may each enqueue them);
- a trial whose worker died is failed by Optuna's heartbeat (``fail_stale``) rather than by the
  next worker to start, which cannot tell a dead worker's trial from a live one's.
"""

from __future__ import annotations

import fcntl
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..common.study_url import is_shared

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeatThread  # the context get_heartbeat_thread returns
from ..errors import RefusalError

HEARTBEAT_SECONDS = 30  # a worker's running trial beats this often ...
GRACE_SECONDS = 120  # ... and is failed as stale after this long without a beat


def open_storage(storage: str) -> BaseStorage:
    """The Optuna storage for a journal file path or a database URL."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if not is_shared(storage):
        return JournalStorage(JournalFileBackend(storage))
    try:
        return RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
    except Exception as e:  # sqlalchemy raises many types for a bad URL or an unreachable server
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RefusalError(f"cannot open the study storage {storage} ({first}); give a URL such as sqlite:///study.db") from None


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Under ``--quiet``, Optuna's warnings (experimental features, its heartbeat) are silenced with our status lines."""
    from ..common.progress import is_quiet

    with warnings.catch_warnings():
        if is_quiet():
            warnings.filterwarnings("ignore", module="optuna")  # issued from Optuna's own code
            try:
                from optuna.exceptions import ExperimentalWarning

                warnings.filterwarnings("ignore", category=ExperimentalWarning)  # issued where our code calls Optuna
            except ImportError:  # run_trials says how to install it
                pass
        yield


@contextmanager
def StudyLock(storage: str) -> Iterator[None]:  # noqa: N802 (a context manager read as a noun)
    """An exclusive lock between the workers of one SQLite study (a file beside the database); no lock otherwise."""
    if not storage.startswith("sqlite:///"):
        yield
        return
    path = Path(storage[len("sqlite:///") :]).expanduser().with_suffix(".lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def surplus(study: optuna.Study, trial: optuna.Trial, target: int, sampled_roles: tuple[str, ...]) -> bool:
    """True when ``target`` trials with a role in ``sampled_roles`` were finished or running before ``trial`` was
    handed out (by number): with several workers this one is then one too many."""
    import optuna

    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    before = [
        t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number and t.user_attrs.get("role", "sampled") in sampled_roles
    ]
    return len(before) >= target


def fail_stale(study: optuna.Study) -> None:
    """Fail the running trials whose worker stopped beating (a shared database)."""
    import optuna

    optuna.storages.fail_stale_trials(study)


def wait_for_running(study: optuna.Study, roles: tuple[str, ...], timeout: float = GRACE_SECONDS * 2) -> None:
    """Wait until no trial with a role in ``roles`` is running (other workers finishing their last trials)."""
    import optuna

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fail_stale(study)
        running = [
            t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.user_attrs.get("role", "sampled") in roles
        ]
        if not running:
            return
        time.sleep(1.0)


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> BaseHeartbeatThread:
    """A context that keeps ``trial``'s heartbeat in a shared study while it runs (Optuna's own thread)."""
    from optuna.storages._heartbeat import get_heartbeat_thread  # Optuna's ask/tell path has no public form of it

    return get_heartbeat_thread(trial._trial_id, study._storage)
