"""`run_pretraining`: a pre-training run from settings to a finished run folder.

The run goes through small steps that share one `RunContext`:

1. check the arguments and the folder (nothing is written yet);
2. resolve the data, precision, placement and sizes (`_resolve`), and the record
   `config.json` will hold; a resume must be the same run;
3. under the folder's lock: build the model under the placement's scope (`_build`),
   restore the newest checkpoint when resuming (`_restore`), train
   (`keras_ssrl.training.loop.train`) and write the outputs
   (`keras_ssrl.training.outputs.finish`).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable

from keras_ssrl.config import PRECISIONS, ConfigError, PretrainConfig, validate_config
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.files import remove_stale_temporaries, write_json_atomic
from keras_ssrl.runs import (
    CONFIG_JSON,
    RunDirError,
    check_outside,
    locked_folder,
    stale_temporaries_pattern,
)
from keras_ssrl.training import loop, outputs
from keras_ssrl.training.checkpoints import VariablesCheckpoint
from keras_ssrl.training.context import (
    DEFAULT_BUILTIN,
    DEFAULT_CHECKPOINT_EVERY,
    ResumePoint,
    RunContext,
    RunModel,
    RunOptions,
)
from keras_ssrl.training.device_input import CACHE_MODES, choose_input, load_rows
from keras_ssrl.training.input import (
    TrainingPlan,
    naming_damaged_shards,
    pretrain_subset,
)
from keras_ssrl.training.placement import DISTRIBUTE, make_placement
from keras_ssrl.training.rundir import (
    RUN_FILES,
    check_same_run,
    existing_run,
    run_record,
)
from keras_ssrl.training.signals import SigtermHandler, on_sigterm


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy for `precision`.

    `auto` is `float32` unless every visible GPU has tensor cores (compute capability
    >= 7.0); then `mixed_float16` under TensorFlow, and under JAX `mixed_bfloat16` on
    compute capability >= 8.0 (the same tensor-core rate as float16, float32's range,
    so no loss scaling) or `mixed_float16` on 7.x. CPUs gain nothing from 16 bits.

    Args:
        precision: `auto`, `float32`, `mixed_float16` or `mixed_bfloat16`.

    Returns:
        A policy name other than `auto`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    capabilities = _gpu_compute_capabilities()
    if not capabilities or min(capabilities) < (7, 0):
        return "float32"
    import keras

    if keras.backend.backend() == "jax" and min(capabilities) >= (8, 0):
        return "mixed_bfloat16"
    return "mixed_float16"


def _gpu_compute_capabilities() -> list[tuple[int, int]]:
    """`(major, minor)` of every visible GPU of the running backend."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        found = []
        for device in jax.devices():
            if device.platform != "gpu":
                continue
            text = str(getattr(device, "compute_capability", "0.0"))
            major, _, minor = text.partition(".")
            found.append((int(major or 0), int(minor or 0)))
        return found
    import tensorflow as tf

    return [
        tuple(
            tf.config.experimental.get_device_details(gpu).get("compute_capability")
            or (0, 0)
        )
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def run_pretraining(
    config: PretrainConfig,
    data_dir: str | None,
    run_dir: str,
    *,
    resume: bool = False,
    distribute: str = "none",
    cache: str = "auto",
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
    command: list[str] | None = None,
) -> dict:
    """Pre-trains an encoder with SCARF, VIME or BYOL and writes a run folder.

    Args:
        config: a `PretrainConfig` (method, schedule, encoder, method settings).
        data_dir: str, a converted dataset folder, or None for the built-in
            `synthetic-tcga` data (converted once into the cache folder).
        run_dir: str, the local run folder (see `keras_ssrl.training` for its files).
        resume: bool, continue the run in `run_dir` from its newest complete
            checkpoint. It must be the same run: same method, configuration, gene
            list, dataset and precision, or `RunDirError` names the differences. With
            no checkpoint yet, training starts from the beginning; a folder without a
            run (no `config.json`) is refused. Without `resume`, `run_dir` must be
            missing or empty.
        distribute: `none` or `data-parallel` (`keras_ssrl.training.placement`:
            `MirroredStrategy` under TensorFlow, `keras.distribution.DataParallel`
            under JAX; `mirrored` is TensorFlow's older name). `config.batch_size` is
            the global batch.
        cache: `auto`, `device` or `none`: keep the standardised split on the
            accelerator and gather batches there (`keras_ssrl.training.device_input`;
            `auto` does when the backend is JAX with an accelerator and it fits). A
            resumed run keeps the input it started with.
        checkpoint_every: int, checkpoint period in steps (0: epoch ends only).
        verbose: Keras `fit` verbosity (`"auto"`, 0, 1, 2).
        log: callable receiving progress lines.
        command: the command line, recorded in `config.json`.

    Returns:
        The summary written to `summary.json`.

    Raises:
        ConfigError: an invalid setting (`field` names it).
        DataError: unreadable or unsuitable data; `DamagedDataError` when a shard
            cannot be read during training (the shard is named).
        RunDirError: `run_dir` holds another run (or a different one to resume),
            foreign files, or is in use by another process (its PID is named).
        NonFiniteLossError: the loss became NaN or inf (the step is named); the
            checkpoints keep the last finite state.
        TrainingInterrupted: SIGTERM received; a checkpoint of the current step was
            written, `resume=True` continues.

    Example:

    ```python
    from keras_ssrl.config import PretrainConfig
    summary = run_pretraining(PretrainConfig(method="scarf", epochs=5), None, "runs/s")
    encoder = keras.saving.load_model("runs/s/encoder.keras")
    ```
    """
    options = RunOptions(
        resume=resume,
        distribute=distribute,
        cache=cache,
        checkpoint_every=checkpoint_every,
        verbose=verbose,
        log=log,
        command=command,
    )
    run_dir = _check_arguments(config, run_dir, options)
    # Every refusal the folder allows, before the (slow) data checks and any write.
    saved = existing_run(run_dir, resume)
    run = _resolve(config, data_dir, run_dir, options, saved)
    record = run_record(run)
    if saved is not None:
        check_same_run(saved, record, run_dir)
    with locked_folder(run_dir, "run folder"):
        # Again under the lock: another process may have started a run meanwhile.
        saved = existing_run(run_dir, resume)
        if saved is not None:
            check_same_run(saved, record, run_dir)
        remove_stale_temporaries(run_dir, stale_temporaries_pattern(RUN_FILES), log)
        return _run_locked(run, record if saved is None else None)


def _check_arguments(config: PretrainConfig, run_dir: str, options: RunOptions):
    """Validates the settings; returns the absolute run folder."""
    validate_config(config)
    if options.cache not in CACHE_MODES:
        raise ConfigError(
            f"cache must be one of {CACHE_MODES}, got {options.cache!r}", "cache"
        )
    if options.distribute not in DISTRIBUTE:
        raise ConfigError(
            f"distribute must be one of {DISTRIBUTE}, got {options.distribute!r}"
        )
    every = options.checkpoint_every
    if not isinstance(every, numbers.Integral) or isinstance(every, bool) or every < 0:
        raise ConfigError(
            f"checkpoint_every must be an int >= 0, got {every!r}", "checkpoint_every"
        )
    if "://" in str(run_dir):
        raise RunDirError(
            f"{run_dir}: the run folder must be local (checkpoints are renamed "
            "atomically); copy it to remote storage afterwards"
        )
    return os.path.abspath(run_dir)


def _resolve(
    config: PretrainConfig,
    data_dir: str | None,
    run_dir: str,
    options: RunOptions,
    saved: dict | None = None,
) -> RunContext:
    """The run's data (the built-in set when None), precision, placement and sizes."""
    from keras_ssrl.data.builtin import ensure_builtin

    builtin = None
    if data_dir is None:
        builtin = DEFAULT_BUILTIN
        data_dir = ensure_builtin(DEFAULT_BUILTIN, log=options.log)
    manifest = Manifest.load(data_dir)
    for split in (schema.PRETRAIN, schema.PRETRAIN_VAL):
        if manifest.num_records(split) < 1:
            raise DataError(f"{data_dir}: split {split!r} is empty")
    check_outside(run_dir, data_dir, "run folder")
    precision = resolve_precision(config.precision)
    subset = pretrain_subset(data_dir, config.pretrain_fraction, config.seed)
    n_train = len(subset) if subset is not None else manifest.num_records("pretrain")
    placement = make_placement(options.distribute)
    plan = TrainingPlan.create(
        n_train,
        int(config.batch_size),
        config.epochs,
        placement.replicas,
        row_multiple=placement.row_multiple,
        processes=placement.processes,
        process_index=placement.process_index,
    )
    cache = options.cache
    saved_input = ((saved or {}).get("training") or {}).get("input")
    if saved_input is not None:
        # The two inputs order samples differently: a resumed run keeps its own.
        cache = "device" if saved_input == "device" else "none"
        if options.cache not in ("auto", cache):
            options.log(
                f"--cache {options.cache} ignored: the run being resumed used "
                f"{'the device copy' if cache == 'device' else 'streaming'}"
            )
    choice = choose_input(cache, n_train, manifest.n_genes, precision)
    if saved_input == "device" and not choice.on_device:
        raise RunDirError(
            f"cannot resume {run_dir}: it trained on a device copy of the split, "
            f"which does not fit here ({choice.message})"
        )
    options.log(choice.message)
    return RunContext(
        config=config,
        options=options,
        run_dir=run_dir,
        data_dir=data_dir,
        builtin=builtin,
        manifest=manifest,
        subset=subset,
        precision=precision,
        placement=placement,
        plan=plan,
        input=choice,
    )


def _run_locked(run: RunContext, new_record: dict | None) -> dict:
    """Builds, restores, trains and finishes; the folder's lock is held.

    `new_record` is the `config.json` of a new run (None when resuming), written once
    the model is built: a refused run leaves no config.json.
    """
    import keras

    config = run.config
    previous_policy = keras.config.dtype_policy()
    # Before any layer exists: layers take the global policy when built.
    keras.config.set_dtype_policy(run.precision)
    try:
        keras.utils.set_random_seed(config.seed)
        with run.placement.build_scope():
            built = _build(run)
        if new_record is not None:
            write_json_atomic(run.path(CONFIG_JSON), new_record)
        run.log(
            f"{config.method}: {run.plan.n_train} training samples x "
            f"{run.manifest.n_genes} genes, {run.plan.steps_per_epoch} steps/epoch x "
            f"{run.plan.epochs} epochs, precision {run.precision}, {run.replicas} "
            f"replica(s); run folder {run.run_dir}"
        )
        start = ResumePoint()
        if run.options.resume:
            with run.placement.build_scope():
                start = _restore(run, built)
        sigterm = SigtermHandler()
        with (
            on_sigterm(sigterm),
            naming_damaged_shards(run.data_dir),
            run.placement.training_scope(),
        ):
            seconds = loop.train(run, built, start, sigterm)
            sigterm.during_training = None
            summary = outputs.finish(run, built, start, seconds)
        if sigterm.received:
            run.log("SIGTERM received once training had finished: the run completed")
        return summary
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _build(run: RunContext) -> RunModel:
    """The encoder, the method around it (compiled), best weights and checkpoint."""
    import keras

    from keras_ssrl.callbacks import BestEncoderWeights
    from keras_ssrl.encoders import build_encoder
    from keras_ssrl.methods import build_method

    config, n_genes = run.config, run.manifest.n_genes
    encoder = build_encoder(
        n_genes,
        config.encoder.layers,
        config.encoder.width,
        config.encoder.dropout,
        # Several TensorFlow replicas: normalise with global-batch statistics, as one
        # device does (JAX data parallelism computes them over the global batch).
        synchronized_batchnorm=run.placement.strategy is not None and run.replicas > 1,
    )
    try:
        model = build_method(
            config.method,
            encoder,
            n_genes,
            config,
            total_steps=run.plan.total_steps,
            seed=config.seed,
        )
    except ValueError as error:  # a method setting out of range
        raise ConfigError(f"{config.method}: {error}") from error
    # Through compile, so that Keras wraps it in a LossScaleOptimizer under float16.
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    best = BestEncoderWeights(encoder, copy_weights=config.keep == "best")
    # Optimizer slots are created lazily: create them now, so that every checkpoint
    # (and a restore before the first step) covers them.
    model.optimizer.build(model.trainable_variables)
    checkpoint = VariablesCheckpoint(
        model=model.variables,
        optimizer=model.optimizer.variables,
        best_encoder=best.variables,
    )
    if run.input.on_device:
        # After the checkpoint is made: the data is never part of it.
        from keras_ssrl.layers import DeviceRows

        rows = load_rows(
            run.data_dir,
            run.plan.n_train,
            n_genes,
            run.input.storage_dtype,
            subset=run.subset,
        )
        model.use_device_rows(DeviceRows(rows, run.input.storage_dtype))
        del rows
    return RunModel(encoder=encoder, model=model, best=best, checkpoint=checkpoint)


def _restore(run: RunContext, built: RunModel) -> ResumePoint:
    """Restores the newest checkpoint of the run folder; step 0 when there is none."""
    try:
        found = loop.checkpoint_store(run).restore_latest(built.checkpoint)
    except AssertionError as error:  # the saved objects differ from those built
        raise RunDirError(
            f"cannot resume {run.run_dir}: its checkpoint does not match the model "
            f"built from its config ({str(error).splitlines()[0]})"
        ) from error
    if found is None:
        run.log("no checkpoint to resume from: starting from step 0")
        return ResumePoint()
    folder, state = found
    if state.get("steps_per_epoch") != run.plan.steps_per_epoch:
        raise RunDirError(
            f"cannot resume {run.run_dir}: its checkpoint has "
            f"{state.get('steps_per_epoch')} steps per epoch, this setup "
            f"{run.plan.steps_per_epoch}"
        )
    built.best.load_state(state.get("best", {}))
    run.log(f"resuming from step {state['step']} ({folder})")
    return ResumePoint(step=int(state["step"]), state=state)
