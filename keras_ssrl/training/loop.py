"""The training loop of a run: `fit` from the resume point to the end, and its stops.

The callbacks are wired in a fixed order (the non-finite loss guard first, the
checkpoint saver last); a run ends complete, or raises `NonFiniteLossError` (the loss
became NaN or inf, the last finite state is checkpointed) or `TrainingInterrupted` (a
SIGTERM; a checkpoint of the current step was written).
"""

from __future__ import annotations

import sys
import time

from keras_ssrl.data import schema
from keras_ssrl.runs import CHECKPOINTS_DIR, HISTORY_CSV, LOGS_DIR
from keras_ssrl.training import outputs
from keras_ssrl.training.checkpoints import CheckpointStore
from keras_ssrl.training.context import ResumePoint, RunContext, RunModel
from keras_ssrl.training.device_input import index_batches
from keras_ssrl.training.input import make_train_data, validation_data
from keras_ssrl.training.signals import SigtermHandler


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; `step` is the global step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (SIGTERM) after writing a checkpoint."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def keras_verbosity(verbose: int | str) -> int:
    """`fit`'s verbosity; `"auto"` is a bar on a terminal, else one line per epoch.

    Keras resolves `"auto"` to the bar everywhere: in a log file or a pipe that is
    kilobytes of ANSI escape codes per epoch.
    """
    if verbose != "auto":
        return verbose
    return 1 if sys.stdout.isatty() else 2


def checkpoint_store(run: RunContext) -> CheckpointStore:
    """The run folder's `CheckpointStore`."""
    return CheckpointStore(run.path(CHECKPOINTS_DIR), log=run.log)


def _callbacks(
    run: RunContext, built: RunModel, start: ResumePoint, monitor_data, began: float
):
    """The callbacks of `fit`, with the guard and the saver the loop consults.

    `began` is when this session's training started (`time.perf_counter()`): the
    checkpoints record the training time of every session so far.
    """
    import keras

    from keras_ssrl.callbacks import (
        CollapseMonitor,
        HistoryCSV,
        NonFiniteLossGuard,
        TrainingCheckpoint,
    )

    plan = run.plan

    def checkpoint_state(step: int) -> dict:
        return {
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "best": built.best.state(),
            "seconds": start.seconds + time.perf_counter() - began,
            "samples": plan.samples_at(step),
        }

    guard = NonFiniteLossGuard(initial_step=start.step, log=run.log)
    saver = TrainingCheckpoint(
        checkpoint_store(run),
        built.checkpoint,
        plan.steps_per_epoch,
        every_n_steps=run.options.checkpoint_every,
        initial_step=start.step,
        state_fn=checkpoint_state,
        initial_metrics=(
            start.state.get("metrics") if start.step % plan.steps_per_epoch else None
        ),
        log=run.log,
    )
    # Order matters: the guard first (a non-finite step is never saved); the monitor
    # adds its values to the logs before the loggers; the saver last, so that an
    # epoch-end checkpoint covers everything written for that epoch.
    callbacks = [
        guard,
        CollapseMonitor(built.encoder, monitor_data),
        built.best,
        HistoryCSV(run.path(HISTORY_CSV), append=True),
        keras.callbacks.TensorBoard(
            log_dir=run.path(LOGS_DIR),
            write_graph=False,
            update_freq="epoch",
            profile_batch=0,
        ),
        saver,
    ]
    return callbacks, guard, saver


def train(
    run: RunContext, built: RunModel, start: ResumePoint, sigterm: SigtermHandler
) -> float:
    """Runs `fit` from `start` to the end; returns the seconds it took.

    A SIGTERM (`sigterm`) during training writes a checkpoint at the end of the
    current step and raises `TrainingInterrupted`.
    """
    plan, spe = run.plan, run.plan.steps_per_epoch
    if run.input.on_device:
        train_data = index_batches(plan, run.config.seed)
    else:
        train_data = make_train_data(
            run.data_dir,
            plan.batch_size,
            run.config.seed,
            subset=run.subset,
            min_rows=plan.min_rows,
            row_multiple=plan.row_multiple,
            n_genes=run.manifest.n_genes,
            processes=plan.processes,
            process_index=plan.process_index,
        )
    val_data, monitor_data = validation_data(
        run.data_dir, plan, run.manifest.num_records(schema.PRETRAIN_VAL)
    )
    # Rows of epochs written before a stop and redone now.
    outputs.truncate_history(run.path(HISTORY_CSV), start.step // spe)
    began = time.perf_counter()
    callbacks, guard, saver = _callbacks(run, built, start, monitor_data, began)
    sigterm.during_training = saver.request_stop
    if sigterm.received:  # while the input pipeline was built: stop at once
        saver.request_stop()
    for first, end, skip in plan.phases(start.step):
        built.model.fit(
            train_data(first, end).skip(skip),
            validation_data=val_data,
            epochs=end,
            initial_epoch=first,
            steps_per_epoch=spe - skip,
            shuffle=False,  # shuffled per epoch by make_train_data, reproducibly
            callbacks=callbacks,
            verbose=keras_verbosity(run.options.verbose),
        )
        if guard.stopped_at is not None or saver.preempted:
            break
    seconds = time.perf_counter() - began
    _raise_if_stopped(run, guard, saver)
    return seconds


def _raise_if_stopped(run: RunContext, guard, saver) -> None:
    """Raises the error of a run that `guard` or `saver` stopped before the end."""
    plan = run.plan
    if guard.stopped_at is not None:
        epoch, batch = divmod(guard.stopped_at - 1, plan.steps_per_epoch)
        last = checkpoint_store(run).latest()
        raise NonFiniteLossError(
            f"the loss became {guard.value} at step {guard.stopped_at} (epoch "
            f"{epoch + 1}, batch {batch + 1}); training stopped. The last finite "
            f"state is in {last[0] if last else 'no checkpoint'}; lower the "
            "learning rate or check the data",
            guard.stopped_at,
        )
    if saver.preempted and saver.step < plan.total_steps:
        last = checkpoint_store(run).latest()
        folder = last[0] if last else None
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {saver.step} of {plan.total_steps}; "
            f"checkpoint {folder}; continue with --resume",
            saver.step,
            folder,
        )
