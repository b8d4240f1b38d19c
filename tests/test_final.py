"""The final phase's pure parts: its layout, the epoch plan under a time budget, the pick among
re-trained configurations, the flags; then, on the session's Ray cluster, the stream reader."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import tiny_digits

from raylocal.budget import (DEFAULT_BUDGET_MINUTES, FINISH_SECONDS, ONE_VIEW_COPY_SECONDS, SEARCH_SHARE, START_SECONDS,
                             VIEW_SECONDS, TimeBudget)
from raylocal.config import OBJECTIVE, ConfigError, Hyperparameters
from raylocal.engine import fit
from raylocal.final import (
    DDP_EFFICIENCY,
    DEFAULT_FINAL_EPOCHS,
    FINAL_LR_SCALE,
    MAX_FINAL_EPOCHS,
    Candidate,
    FinalRun,
    FinalSettings,
    candidates,
    checkpoint_lr,
    continued_lr,
    epoch_line,
    fit_to_deadline,
    pick_winner,
    plan_epochs,
)
from raylocal.model import build_model
from raylocal.resources import final_layout
from raylocal.synthesis import split_plan, synthesize_shard
from raylocal.plan import build_plan
from raylocal.settings import Settings
from raylocal.tune import get_args_parser


def test_final_layout_takes_every_cpu_or_every_gpu():
    cpus = final_layout(2, 0)
    assert (cpus.backend, cpus.workers, cpus.cpus_per_worker, cpus.dist_backend) == ("ray-train", 2, 1, "gloo")
    assert final_layout(16, 0, cpus_per_worker=4).workers == 4
    gpus = final_layout(16, 4, cpus_per_worker=2)
    assert (gpus.workers, gpus.gpus_per_worker, gpus.cpus_per_worker, gpus.device) == (4, 1.0, 2, "cuda")
    assert gpus.dist_backend == "nccl"
    # Ray's logical GPUs with --device cpu: the CPUs do the work.
    logical = final_layout(2, 2, device="cpu")
    assert (logical.workers, logical.gpus_per_worker, logical.device) == (2, 0.0, "cpu")
    assert final_layout(1, 0).workers == 1


def candidate(trial_id: str, score: float = 0.9, speed: float = 1000.0) -> Candidate:
    return Candidate(trial_id=trial_id, config={"lr": 1e-3}, score=score, epoch=5.0, canvases_per_s=speed)


def test_without_a_budget_the_final_trains_the_given_or_default_epochs():
    layout = final_layout(2, 0)
    assert plan_epochs(FinalSettings(), [candidate("a")], layout, 55_000, 5_000, None)[0] == DEFAULT_FINAL_EPOCHS
    assert plan_epochs(FinalSettings(epochs=3), [candidate("a")], layout, 55_000, 5_000, None)[0] == 3


def test_with_a_budget_the_epochs_fill_the_time_left_at_the_searched_speed():
    layout = final_layout(2, 0)
    rows, val_rows, speed = 55_000, 6_000, 1000.0
    epoch_seconds = (rows + val_rows / 3) / (speed * 2 * DDP_EFFICIENCY)
    # The final phase must end FINISH_SECONDS before the end of the budget; 600 s are left for it.
    budget = TimeBudget(seconds=600 + FINISH_SECONDS, started=time.time())
    epochs, line = plan_epochs(FinalSettings(), [candidate("a", speed=speed)], layout, rows, val_rows, budget)
    assert epochs == int((600 - START_SECONDS) // epoch_seconds) == 15
    assert "15 epochs" in line and "min left" in line
    # Two runs share the time; the slower candidate sets the pace; --final-epochs caps it.
    two = [candidate("a", speed=speed), candidate("b", speed=speed / 2)]
    assert plan_epochs(FinalSettings(top_k=2), two, layout, rows, val_rows, budget)[0] == int(
        (300 - START_SECONDS) // (2 * epoch_seconds))
    assert plan_epochs(FinalSettings(epochs=4), [candidate("a", speed=speed)], layout, rows, val_rows, budget)[0] == 4
    fast = candidate("a", speed=1e7)
    assert plan_epochs(FinalSettings(), [fast], layout, rows, val_rows, budget)[0] == MAX_FINAL_EPOCHS
    spent = TimeBudget(seconds=60, started=time.time() - 30)
    assert plan_epochs(FinalSettings(), [candidate("a")], layout, rows, val_rows, spent)[0] == 0


def test_the_search_gets_its_share_of_the_time_left_to_train():
    budget = TimeBudget(seconds=1000 + FINISH_SECONDS, started=time.time() - 100)
    assert budget.deadline == pytest.approx(budget.started + 1000)
    # 900 s left before the deadline, less the final run's start-up, and the search's share of that.
    assert budget.search_seconds() == pytest.approx(SEARCH_SHARE * (900 - START_SECONDS), abs=2)
    assert TimeBudget(seconds=100, started=time.time() - 100).search_seconds() == 1.0  # Tune reads 0 as none
    # Too little left for a final run to start and train: the search takes all of it.
    tight = TimeBudget(seconds=2 * START_SECONDS + FINISH_SECONDS, started=time.time())
    assert tight.search_seconds() == pytest.approx(2 * START_SECONDS, abs=2)
    assert "(no room for a final phase)" in tight.describe(tight.search_seconds())
    assert (f"stops starting and running trials 6.4 min from now ({SEARCH_SHARE:.0%} of the time left to train)"
            in budget.describe(384))
    alone = TimeBudget.for_command(10, time.time(), final=False)
    assert alone.search_seconds() == pytest.approx(600 - FINISH_SECONDS, abs=2)
    assert "of the time left to train" not in alone.describe(alone.search_seconds())
    # Fixed costs come off the top, not off the final phase alone: a small budget's search is smaller.
    small, large = (TimeBudget.for_command(minutes, time.time(), final=True) for minutes in (6, 19))
    assert small.search_seconds() / 360 < large.search_seconds() / (19 * 60) < SEARCH_SHARE
    # --search-share: the same split at another share, said in the plan.
    half = TimeBudget(seconds=1000 + FINISH_SECONDS, started=time.time() - 100, share=0.5)
    assert half.search_seconds() == pytest.approx(0.5 * (900 - START_SECONDS), abs=2)
    assert "(50% of the time left to train)" in half.describe(half.search_seconds())


def test_a_budget_keeps_one_more_test_pass_per_extra_view_for_the_end():
    now = time.time()
    one, five = (TimeBudget.for_command(10, now, final=True, views=views) for views in (1, 5))
    assert one.deadline == now + 600 - FINISH_SECONDS
    # Four more test passes, and the one-view copy the model card's latency times.
    kept = 4 * VIEW_SECONDS + ONE_VIEW_COPY_SECONDS
    assert five.deadline == pytest.approx(one.deadline - kept)
    assert f"less {FINISH_SECONDS + kept:g} s for scoring and export" in five.describe(five.search_seconds())


def run(trial_id: str, seed: int, score: float) -> FinalRun:
    return FinalRun(candidate=candidate(trial_id), seed=seed, params=Hyperparameters(), state={},
                    curve=[{"epoch": 1.0, OBJECTIVE: score}], seconds=1.0, placement={})


def test_the_winner_is_the_configuration_with_the_best_mean_over_seeds():
    # b has the single best run, a the better mean: a wins, with its better seed.
    runs = [run("a", 0, 0.90), run("a", 1, 0.92), run("b", 0, 0.95), run("b", 1, 0.80)]
    winner = pick_winner(runs)
    assert (winner.candidate.trial_id, winner.seed) == ("a", 1)


def searched(config: dict, curve: dict[float, float]):
    """A finished trial as Tune's ResultGrid holds it: its config and its reports by epoch."""
    import pandas as pd
    from ray.tune import Result

    frame = pd.DataFrame({"epoch": list(curve), OBJECTIVE: list(curve.values()), "train_images_per_s": 500.0})
    return Result(metrics={"config": config}, checkpoint=None, error=None, path=f"/trials/{config['lr']}",
                  metrics_dataframe=frame)


def test_candidates_are_compared_with_the_start_point_at_equal_epochs():
    start = {"width": 16, "lr": 0.003}
    results = [
        searched(start, {0.5: 0.80, 1.0: 0.85, 2.0: 0.89, 3.0: 0.91}),
        # Twice as fast: further, with the best score of all, but behind the start point at its epoch 3.
        searched({"width": 8, "lr": 0.002}, {0.5: 0.81, 1.0: 0.84, 2.0: 0.88, 3.0: 0.905, 5.0: 0.93}),
        # Ahead at every epoch it shares with the start point.
        searched({"width": 16, "lr": 0.001}, {0.5: 0.82, 1.0: 0.86, 2.0: 0.90, 3.0: 0.915}),
        # Ahead at the first rung, but stopped there: it cannot be compared at equal epochs.
        searched({"width": 8, "lr": 0.009}, {0.5: 0.95}),
    ]
    chosen = candidates(results, top_k=4, start_point=start)
    assert [candidate.config["lr"] for candidate in chosen] == [0.001, 0.003, 0.002, 0.009]
    assert [candidate.compared_at for candidate in chosen] == [3.0, 3.0, 3.0, None]
    # No score up to the start point's epoch (NaN there): behind it, not ahead.
    unscored = searched({"width": 8, "lr": 0.004}, {1.0: float("nan"), 3.0: float("nan"), 4.0: 0.99})
    assert [c.config["lr"] for c in candidates([unscored, results[0]], top_k=2, start_point=start)] == [0.003, 0.004]
    assert candidates(results, top_k=1, start_point=start)[0].score == 0.915
    # A tie at the start point's last epoch keeps the start point.
    tie = [searched({"width": 8, "lr": 0.002}, {1.0: 0.85, 3.0: 0.91, 4.0: 0.93}), results[0]]
    assert candidates(tie, top_k=1, start_point=start)[0].config == start
    # Without a start point (or where it never reported), the best score anywhere wins.
    assert [c.config["lr"] for c in candidates(results, top_k=2)] == [0.009, 0.002]
    assert candidates(results[1:], top_k=1, start_point=start)[0].config["lr"] == 0.009


def test_final_flags_and_default_budget():
    def parse(flags):
        return Settings.from_args(get_args_parser().parse_args(flags))

    plan = build_plan(parse([]))
    assert plan.budget_minutes == DEFAULT_BUDGET_MINUTES and plan.final == FinalSettings()
    smoke = build_plan(parse(["--smoke-test"]))
    assert smoke.budget_minutes is None and smoke.final.epochs == 1
    assert build_plan(parse(["--time-budget", "0"])).budget_minutes is None
    assert build_plan(parse(["--time-budget", "1.6", "--views", "1"])).budget_minutes == 1.6  # 80 s kept
    assert plan.search_share == SEARCH_SHARE and build_plan(parse(["--search-share", "0.5"])).search_share == 0.5
    assert plan.final.init == "checkpoint"
    custom = build_plan(parse(["--final-top-k", "3", "--final-seeds", "2", "--final-epochs", "7", "--no-final",
                               "--final-init", "scratch", "--final-lr-scale", "0.5"]))
    assert custom.final == FinalSettings(epochs=7, top_k=3, seeds=2, enabled=False, init="scratch", lr_scale=0.5)
    with pytest.raises(ConfigError, match="--final-init must be one of"):
        FinalSettings(init="warm")
    for flags, message in [(["--time-budget", "-1"], "--time-budget must be >= 0"),
                           (["--search-share", "0"], "--search-share must be between 0 and 1, got 0"),
                           (["--search-share", "1"], "--search-share must be between 0 and 1, got 1"),
                           (["--final-top-k", "0"], "--final-top-k must be >= 1"),
                           (["--final-seeds", "0"], "--final-seeds must be >= 1"),
                           (["--final-epochs", "0"], "--final-epochs must be >= 1"),
                           (["--final-lr-scale", "0"], r"--final-lr-scale must be in \(0, 10\]"),
                           # 123 s kept to score 5 views and export, 40 s for a trial to start
                           (["--time-budget", "2.7"], r"--time-budget 2.7 min leaves no time to train: .* 123 s .* "
                                                      r"5 view\(s\) .* more than 2.7 min, or fewer --views")]:
        with pytest.raises(ConfigError, match=message):
            build_plan(parse(flags))


def tiny_split():
    """`split(name, epoch)`: one shard of 300 tiny generated digits, placed for that split and epoch."""
    images, labels = tiny_digits(np.random.default_rng(0), 300)
    plan = split_plan(len(images), 0)
    return lambda name, epoch: synthesize_shard(images, labels, plan, seed=0, split=name, epoch=epoch, shard=0,
                                                shard_size=300)


def test_fit_ends_after_the_report_where_stop_says_so():
    split = tiny_split()
    reports, asked = [], []

    def stop() -> bool:
        asked.append(len(reports))
        return len(reports) == 2

    torch.set_num_threads(1)
    fit(Hyperparameters(depth=2, width=4, head_width=16, batch_size=32), max_epochs=3, first_epoch_reports=1,
        reports_per_epoch=1, train_data=lambda epoch: split("train", epoch), val_data=split("val", 0),
        train_rows=len(split("train", 0)["label"]), report=lambda metrics, state: reports.append(metrics["epoch"]),
        device=torch.device("cpu"), stop=stop)
    assert reports == [1.0, 2.0] and asked == [1, 2]


def test_fit_starts_from_the_given_weights():
    split = tiny_split()
    # A learning rate too small to move any weight: what the run ends with is what it started from.
    params = Hyperparameters(depth=2, width=4, head_width=16, batch_size=32, lr=1e-12, weight_decay=0.0)
    # Not any initialization fit would draw itself: every weight moved off the seeded one.
    start = {key: value + 0.5 if value.is_floating_point() else value
             for key, value in build_model(params.model_config()).state_dict().items()}
    states = []
    torch.set_num_threads(1)
    fit(params, max_epochs=1, first_epoch_reports=1, reports_per_epoch=1, train_data=lambda epoch: split("train", epoch),
        val_data=split("val", 0), train_rows=len(split("train", 0)["label"]),
        report=lambda metrics, state: states.append(state), device=torch.device("cpu"), init=start)
    # Batch norm's running statistics move with the data; every learned weight stays where it started.
    for key in [key for key, value in start.items() if value.is_floating_point() and "running" not in key]:
        torch.testing.assert_close(states[-1]["model"][key], start[key], atol=1e-6, rtol=0)


def test_a_run_from_a_checkpoint_goes_on_at_the_rate_its_schedule_had_reached():
    split = tiny_split()
    params = Hyperparameters(depth=2, width=4, head_width=16, batch_size=32, lr=3e-3)
    states = []
    torch.set_num_threads(1)
    fit(params, max_epochs=4, first_epoch_reports=2, reports_per_epoch=1, train_data=lambda epoch: split("train", epoch),
        val_data=split("val", 0), train_rows=len(split("train", 0)["label"]),
        report=lambda metrics, state: states.append(state), device=torch.device("cpu"))
    reached = [checkpoint_lr(state) for state in states]
    # One-cycle: near the peak just after the warm-up, about 0 where the schedule ends.
    assert params.lr * 0.9 < reached[0] <= params.lr and reached[-1] < params.lr * 0.01
    # Early in its schedule (a time budget ended the trial) the run goes on at the rate reached; annealed, at the least.
    assert continued_lr(params.lr, FINAL_LR_SCALE, states[0]) == reached[0]
    assert continued_lr(params.lr, FINAL_LR_SCALE, states[-1]) == pytest.approx(FINAL_LR_SCALE * params.lr)
    assert continued_lr(params.lr, 1.0, states[0]) == params.lr


def test_a_final_epoch_is_one_line_with_its_place_in_the_plan_and_its_figures():
    metrics = {"epoch": 3.0, OBJECTIVE: 0.95123, "val_mean_iou": 0.9601, "val_accuracy": 0.99456, "report_seconds": 58.4}
    assert epoch_line("final-1-seed0", metrics, 14) == (
        "final: final-1-seed0: epoch 3 of 14: validation det IoU 0.9512, mean IoU 0.9601, accuracy 0.9946; "
        "58 s this epoch")


def test_rays_per_report_log_lines_are_hidden_unless_asked_for_and_put_back_after():
    import logging

    from raylocal.trial import ray_report_logs, report_logger_names

    names = report_logger_names()
    # Train's "Reporting training result" logger is named by its module's file, not "ray.train...".
    assert len(names) == 3 and names[2].endswith("context.py"), names
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    with ray_report_logs(shown=False):
        assert all(not logger.isEnabledFor(logging.INFO) for logger in loggers)
        assert all(logger.isEnabledFor(logging.WARNING) for logger in loggers)
    assert [logger.level for logger in loggers] == before
    with ray_report_logs(shown=True):
        assert [logger.level for logger in loggers] == before


def test_the_stream_reader_hands_out_exact_pieces_across_blocks(ray_session):
    import ray

    from raylocal.data import StreamReader

    rows = [{"image": np.full((75, 75), i % 256, np.uint8), "box": np.zeros(4, np.float32), "label": i,
             "extra": 0} for i in range(100)]
    reader = StreamReader(ray.data.from_items(rows, override_num_blocks=7).iterator())
    pieces = [reader.take(30) for _ in range(3)]
    assert [len(piece["label"]) for piece in pieces] == [30, 30, 30]
    assert set(pieces[0]) == {"image", "box", "label"}
    seen = np.concatenate([piece["label"] for piece in pieces])
    assert len(set(seen.tolist())) == 90
    with pytest.raises(RuntimeError, match="ended 20 rows short"):
        reader.take(30)


def test_the_streams_scheduling_loop_waits_while_its_budget_holds_it_back(ray_session, tiny_mnist_dir):
    """Read slowly, the stream is held back by its object-store budget; Ray Data's loop then spins
    (hundreds of steps a second), raylocal's paced one waits. Both hand out the same canvases."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.data._internal.execution.execution_callback import ExecutionCallback
    from ray.data._internal.execution.streaming_executor_state import WAIT_FOR_TASK_COMPLETION_TIMEOUT_S

    from raylocal.config import DataSettings
    from raylocal.data import build_search_data, dataset_context, train_stream
    from raylocal.mnist import load_mnist

    mnist = load_mnist(tiny_mnist_dir, verify=False, log=lambda line: None)
    data = build_search_data(mnist, DataSettings(train_digits=1200, test_digits=100, shard_size=100), epochs=0,
                             seed=0, log=lambda line: None)

    def read_slowly(paced: bool) -> tuple[float, np.ndarray]:
        """Idle steps (nothing moved, no reader waiting) per second of reading, and the labels read."""
        idle, last = [], [None]

        class CountIdleSteps(ExecutionCallback):
            def on_execution_step(self, executor) -> None:
                seen = tuple((m.num_inputs_received, m.num_task_outputs_generated, m.num_outputs_taken,
                              m.num_tasks_finished) for m in (op.metrics for op in executor._topology))
                if seen == last[0] and not executor._consumer_idling():
                    idle.append(1)
                last[0] = seen

        with dataset_context(CountIdleSteps):
            stream = train_stream(data, range(2), paced=paced)
        # Room for about two shards of 100 canvases: the stream waits for the reader most of the time.
        stream.context.execution_options = ExecutionOptions(
            resource_limits=ExecutionResources(object_store_memory=2 * 100 * 75 * 75))
        labels, started = [], time.monotonic()
        for block in stream.iter_batches(batch_size=None, batch_format="numpy"):
            labels.append(block["label"])
            time.sleep(0.1)
        return len(idle) / (time.monotonic() - started), np.sort(np.concatenate(labels))

    spinning_rate, spinning_labels = read_slowly(paced=False)
    paced_rate, paced_labels = read_slowly(paced=True)
    assert len(paced_labels) == 2 * len(data.plan.train)
    np.testing.assert_array_equal(paced_labels, spinning_labels)
    # Paced, every idle step waits the loop's task wait first: a bound that holds however fast the
    # machine is (a slower one steps less). Spinning exceeds it on any machine that spins at all.
    bound = 1 / WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    assert paced_rate <= bound < spinning_rate, (paced_rate, bound, spinning_rate)


def fit_tiny(max_epochs: int, first_epoch_reports: int, replan, report) -> int:
    """`engine.fit` of a tiny model on 300 tiny digits with a re-plan; returns its steps per epoch."""
    images, labels = tiny_digits(np.random.default_rng(1), 300)
    plan = split_plan(len(images), 0)
    split = lambda name, epoch: synthesize_shard(images, labels, plan, seed=0, split=name, epoch=epoch, shard=0,
                                                 shard_size=300)
    params = Hyperparameters(depth=2, width=4, head_width=16, batch_size=32)
    torch.set_num_threads(1)
    fit(params, max_epochs=max_epochs, first_epoch_reports=first_epoch_reports, reports_per_epoch=1,
        train_data=lambda epoch: split("train", epoch), val_data=split("val", 0),
        train_rows=len(split("train", 0)["label"]), report=report, device=torch.device("cpu"), replan=replan)
    return len(split("train", 0)["label"]) // params.batch_size


def test_fit_replans_after_every_epoch_and_keeps_the_schedule_continuous():
    reports, asked = [], []
    plans = iter([3, 4, 4])  # after epochs 1, 2 and 3: shrink, then grow, then keep

    def replan(done: int, seconds: float) -> int:
        asked.append((done, seconds))
        return next(plans)

    steps = fit_tiny(6, 2, replan, lambda metrics, state: reports.append(
        (metrics["epoch"], state["max_epochs"], state["scheduler"]["total_steps"], state["scheduler"]["last_epoch"])))
    # Asked after each epoch that leaves epochs to train (not after the last), with its seconds.
    assert [done for done, _ in asked] == [1, 2, 3] and all(seconds > 0 for _, seconds in asked)
    # The schedule is rebuilt at each change, continuing from the steps already taken.
    assert reports == [(0.5, 6, 6 * steps, steps // 2), (1.0, 3, 3 * steps, steps), (2.0, 4, 4 * steps, 2 * steps),
                       (3.0, 4, 4 * steps, 3 * steps), (4.0, 4, 4 * steps, 4 * steps)]


def test_a_replan_to_the_epochs_done_ends_training_there():
    reports = []
    fit_tiny(5, 1, lambda done, seconds: 0 if done == 2 else 5,
             lambda metrics, state: reports.append((metrics["epoch"], state["max_epochs"])))
    assert reports == [(1.0, 5), (2.0, 2)]


def test_the_replan_fits_the_epochs_left_before_the_deadline_up_to_the_cap():
    replan = fit_to_deadline(time.time() + 100, cap=30, device=torch.device("cpu"), world_size=1)
    assert replan(1, 10.0) == 1 + 9  # 100 s left at 10 s an epoch (a few ms already gone)
    assert replan(4, 10.0) == 4 + 9
    assert replan(1, 1.0) == 30
    late = fit_to_deadline(time.time() - 5, cap=30, device=torch.device("cpu"), world_size=1)
    assert late(3, 10.0) == 3 and late(0, 10.0) == 1
