"""What the search does, read back from what it saved: ASHA stops trials at its rungs but never
the start point, every Optuna trial holds its value, the search starts from the experiment's
start point, the seed fixes the next configurations, and TPE then samples differently from what
its seeded random start-up alone would give. Twenty toy trials: the seeded random start-up is
then five of them."""

from __future__ import annotations

import pytest

TRIALS, SEED = 20, 3
EXPERIMENT = f"""
[fixed]
depth = 2
batch_size = 32
[space]
lr = {{ type = "loguniform", low = 1e-4, high = 3e-2 }}
# The defaults (width 16, head 128) are not choices, so the start point takes the first ones: a
# slow model with a poor head, which reaches ASHA's rungs after faster, better trials; ASHA would
# stop it there, and must not (with keep_start_point = false this search stops it: checked once).
width = {{ type = "choice", values = [32, 4] }}
head_width = {{ type = "choice", values = [4, 16] }}
box_loss_weight = {{ type = "loguniform", low = 0.01, high = 1.0 }}
[budget]
trials = {TRIALS}
max_epochs = 2
first_epoch_reports = 2
reports_per_epoch = 2
grace_period = 0.5
reduction_factor = 2
[data]
shard_size = 500
"""


@pytest.fixture(scope="module")
def searched(ray_session, tiny_mnist_dir, tmp_path_factory):
    from raylocal.tune import get_args_parser, main

    root = tmp_path_factory.mktemp("behaviour")
    (root / "space.toml").write_text(EXPERIMENT)
    storage = f"sqlite:///{root / 'optuna.db'}"
    main(get_args_parser().parse_args([
        "--experiment", str(root / "space.toml"), "--data-dir", str(tiny_mnist_dir), "--unverified-data",
        "--seed", str(SEED), "--verbose", "0", "--storage", str(root / "results"), "--name", "behaviour",
        "--optuna-storage", storage, "--no-final", "--time-budget", "0",
    ]))
    return root / "results" / "behaviour", storage


def test_asha_stopped_a_trial_at_one_of_its_rungs(searched):
    from raylocal.results import STOPPED, read_search

    trials = read_search(searched[0])
    assert len(trials) == TRIALS
    stopped = [trial for trial in trials if trial.stop_reason(2.0) == STOPPED]
    assert stopped, [trial.last.get("epoch") for trial in trials]
    rungs = {0.5, 1.0}  # grace period 0.5, reduction factor 2, 2 epochs at most
    assert all(trial.last["epoch"] in rungs for trial in stopped), [trial.last["epoch"] for trial in stopped]


def test_asha_never_stopped_the_start_point(searched):
    from raylocal.config import load_experiment
    from raylocal.results import COMPLETED, read_search
    from raylocal.stopping import is_config

    start_point = load_experiment(searched[0].parents[1] / "space.toml").start_point()
    trials = read_search(searched[0])
    started = [trial for trial in trials if is_config(trial.params, start_point)]
    assert len(started) == 1 and started[0].stop_reason(2.0) == COMPLETED, [trial.last for trial in started]
    # It trained all its epochs although it scored below a rung's cutoff: the median (reduction
    # factor 2) of the other trials' results there. Not the cutoff when it arrived: the first trial
    # is often first at a rung, where ASHA has nothing to compare it with.
    below = cutoffs_beaten(started[0], [trial for trial in trials if trial is not started[0]])
    assert below, "the start point never scored below a rung's cutoff: the test proves nothing"


def cutoffs_beaten(kept, others) -> list[tuple[float, float, float]]:
    """(rung, the kept trial's score there, the cutoff from the others' results there) for each
    rung where the kept trial scored below that cutoff."""
    import numpy as np

    from raylocal.config import OBJECTIVE

    below = []
    for rung in (0.5, 1.0):
        mine = kept.history[kept.history["epoch"] >= rung].iloc[0][OBJECTIVE]
        theirs = [row[OBJECTIVE] for trial in others for _, row in trial.history.iterrows() if row["epoch"] == rung]
        if theirs and mine < (cutoff := np.nanpercentile(theirs, 50)):
            below.append((rung, mine, cutoff))
    return below


def test_every_optuna_trial_holds_its_value(searched):
    import optuna

    experiment_dir, storage = searched
    study = optuna.load_study(study_name=experiment_dir.name, storage=storage)
    assert len(study.trials) == TRIALS
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials)
    assert all(0 <= trial.value <= 1 for trial in study.trials)


def random_only_configurations(experiment_dir) -> list[dict]:
    """What the same seeded TPE would give if it never left its random start-up."""
    import optuna

    from raylocal.config import load_experiment, optuna_space
    from raylocal.tuner import make_sampler

    space = optuna_space(load_experiment(experiment_dir.parents[1] / "space.toml").space)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(TRIALS, SEED, startup=10**6))
    configurations = []
    for _ in range(TRIALS):
        trial = study.ask(space)
        configurations.append(trial.params)
        study.tell(trial, 0.5)
    return configurations


def test_the_seed_fixes_the_first_configurations_and_tpe_then_models(searched):
    import optuna

    from raylocal.config import load_experiment
    from raylocal.tuner import startup_trials

    experiment_dir, storage = searched
    study = optuna.load_study(study_name=experiment_dir.name, storage=storage)
    searched_configurations = [trial.params for trial in sorted(study.trials, key=lambda trial: trial.number)]
    expected = random_only_configurations(experiment_dir)
    startup = startup_trials(TRIALS)
    # The search starts from the experiment's start point, then draws the seeded random start-up.
    start_point = load_experiment(experiment_dir.parents[1] / "space.toml").start_point()
    assert searched_configurations[0] == start_point
    assert startup - 1 >= 4
    assert searched_configurations[1:startup] == expected[:startup - 1]
    # A trial asked for while fewer than `startup` trials have finished is still drawn at random
    # (trials run two at a time here), so only some later ones need differ: random-only would
    # make every one of them equal.
    later = searched_configurations[startup:]
    assert any(config not in expected for config in later), later
