"""The runner: an experiment's data, its encoders, and its runs into a results table.

Subsets are a function of (seed, p, repeat) only, so every method sees the same subset
for a (p, repeat) and repeats differ; the test split is read only to score a trained
model, and nothing (statistics, subsets, early stopping) uses it (docs/protocol.md,
"Fine-tuning", "Label efficiency and AUPC"). `check_data` checks everything a run
would later stop on before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from keras_ssrl.config import EncoderConfig, PretrainConfig
from keras_ssrl.data.manifest import Manifest, genes_digest
from keras_ssrl.evaluation.experiments import (
    LOGREG,
    NO_MODE,
    SSL_METHODS,
    Experiment,
    PretrainSpec,
    ProtocolError,
    RunSpec,
    build_units,
    shard_units,
)
from keras_ssrl.evaluation.results import (
    TENSORBOARD_DIR,
    ResultsTable,
    check_out,
    prepare_out,
    read_results,
    results_name,
    row_key,
)
from keras_ssrl.finetuning import (
    FinetuneData,
    Finetuner,
    Job,
    RunResult,
    StackedFinetuner,
    check_labelled_splits,
    classification_metrics,
    load_encoder_weights,
    load_finetune_data,
    stratified_subset,
    subset_seed,
)
from keras_ssrl.finetuning.run import write_tensorboard

# ------------------------------------------------------------------------ options

PARALLEL_AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How a sweep's runs are carried out; not part of the experiment.

    Attributes:
        parallel_runs: runs of one architecture, mode and encoder trained together as
            one stacked model (`keras_ssrl.finetuning.StackedFinetuner`); `auto` picks
            `auto_parallel_runs(mode)`, 1 trains one run at a time. Results are the same
            either way, up to floating-point order.
        tensorboard: write each run's loss and accuracy per epoch under
            `OUT/tensorboard/<run>/` (off by default: thousands of runs).
    """

    parallel_runs: int | str = PARALLEL_AUTO
    tensorboard: bool = False

    def resolved(self, mode: str) -> int:
        """Runs per stacked model for fine-tuning `mode`."""
        if self.parallel_runs == PARALLEL_AUTO:
            return auto_parallel_runs(mode)
        return int(self.parallel_runs)

    def argv(self) -> list[str]:
        """The same options as command-line flags (for `--jobs` workers)."""
        args = ["--parallel-runs", str(self.parallel_runs)]
        return args + (["--tensorboard"] if self.tensorboard else [])


def parse_parallel_runs(value: str) -> int | str:
    """`--parallel-runs`: `auto` or an integer >= 1."""
    if value == PARALLEL_AUTO:
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ProtocolError(f"--parallel-runs must be auto or >= 1, got {value!r}")
    return number


def auto_parallel_runs(mode: str) -> int:
    """The number of stacked runs that was fastest on this kind of device.

    On a GPU a batch-8 step is launch-bound, so every run of a label fraction (7 kinds
    x 5 repeats) goes into one model. On CPU cores (measured, 16 runs of the built-in
    data, benchmarks/README.md): frozen runs train only a head on fixed embeddings and
    stack 2-4x faster; an unfrozen step is bound by memory traffic over the weights and
    Adam state, which stacking multiplies past the caches (0.6-0.9x), so those run one
    at a time.
    """
    if _has_accelerator():
        return GPU_PARALLEL_RUNS
    return CPU_FROZEN_PARALLEL_RUNS if mode == "frozen" else 1


GPU_PARALLEL_RUNS = 35
CPU_FROZEN_PARALLEL_RUNS = 16


def _has_accelerator() -> bool:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.default_backend() != "cpu"
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


# ------------------------------------------------------------------------ progress


class Progress:
    """A progress line with the ETA, redrawn in place on a terminal.

    Off a terminal (logs, CI) it prints a line at most every `every` seconds.
    """

    def __init__(self, total: int, label: str, stream=None, every: float = 15.0):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.done, self.started = every, 0, time.perf_counter()
        self._last = 0.0

    def update(self, note: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if not self.tty and now - self._last < self.every and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/"
            f"{self.total} runs, {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
            + (f" ({note})" if note else "")
        )
        end = "" if self.tty and self.done < self.total else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60}:{rest % 60:02d}"
    )


# ----------------------------------------------------------------------- data sets


def setting_data(experiment: Experiment, log=print) -> tuple[str, str]:
    """(pre-training data, fine-tuning data) folders of the experiment's setting."""
    from keras_ssrl.data.builtin import cache_root, ensure_builtin

    e = experiment
    if e.finetune_data is not None:
        return e.pretrain_data or e.finetune_data, e.finetune_data
    if e.setting == "tcga":
        folder = ensure_builtin("synthetic-tcga", log=log)
        return e.pretrain_data or folder, folder
    if e.setting == "archs4":
        folder = ensure_builtin("synthetic-archs4", log=log)
        return e.pretrain_data or folder, folder
    if e.setting == "archs4_to_tcga":
        archs4 = ensure_builtin("synthetic-archs4", log=log)
        tcga = ensure_builtin("synthetic-tcga", log=log)
        pretrain, finetune = align_pair(archs4, tcga, cache_root(), log=log)
        return e.pretrain_data or pretrain, finetune
    raise ProtocolError(
        f"unknown setting {e.setting!r}; choose tcga, archs4 or archs4_to_tcga, or "
        "pass --data"
    )


def align_pair(
    pretrain_dir: str, finetune_dir: str, root: str, log=print
) -> tuple[str, str]:
    """Both datasets restricted to their common genes, in one order (transfer setting).

    The pre-training data is rewritten onto the fine-tuning genes it shares, then the
    fine-tuning data onto that list, so that both hold exactly the same genes in the
    same order (docs/protocol.md, "Preprocessing": datasets are combined only through
    explicit alignment, never by column position). Each keeps its own statistics
    (fitted on its own pre-training split). The aligned folders are written once
    under `root`.
    """
    from keras_ssrl.data.align import rewrite_onto

    def name(path):
        return os.path.basename(os.path.normpath(path))

    source = os.path.join(root, f"{name(pretrain_dir)}-on-{name(finetune_dir)}")
    target = os.path.join(root, f"{name(finetune_dir)}-on-{name(pretrain_dir)}")
    if not os.path.exists(os.path.join(source, "manifest.json")):
        log(f"aligning {name(pretrain_dir)} onto the genes of {name(finetune_dir)}")
        rewrite_onto(pretrain_dir, Manifest.load(finetune_dir).genes, source,
                     target_name=name(finetune_dir), log=log)  # fmt: skip
    if not os.path.exists(os.path.join(target, "manifest.json")):
        rewrite_onto(finetune_dir, Manifest.load(source).genes, target,
                     target_name=name(source), log=log)  # fmt: skip
    return source, target


def check_data(
    experiment: Experiment, out_dir: str | None = None, log=print
) -> list[str]:
    """Checks the experiment's datasets and encoders; writes nothing in OUT.

    Built-in data is converted into its cache first. Everything a run would later
    stop on is checked here: the folders (OUT must not be inside a dataset), the
    classes, the records of the fine-tuning splits, the genes pre-training and
    fine-tuning share, and the `--pretrained` encoders.

    Returns:
        Warnings for the user (a test split too small to measure much).
    """
    from keras_ssrl.runs import check_outside

    pretrain_dir, finetune_dir = setting_data(experiment, log=log)
    for flag, folder in (("--data", finetune_dir), ("--pretrain-data", pretrain_dir)):
        if not os.path.isdir(folder):
            raise ProtocolError(f"{flag} {folder}: no such folder")
        if out_dir is not None:
            check_outside(out_dir, folder, "evaluation folder", ProtocolError)
    finetune = Manifest.load(finetune_dir)
    warnings = check_labelled_splits(finetune)  # fewer than 2 classes: refused
    if any(m in SSL_METHODS for m in experiment.methods):
        pretrain = Manifest.load(pretrain_dir)
        if genes_digest(pretrain.genes) != genes_digest(finetune.genes):
            raise ProtocolError(
                f"--pretrain-data {pretrain_dir} and --data {finetune_dir} hold "
                f"different genes ({pretrain.n_genes} and {finetune.n_genes}); an "
                "encoder pre-trained on one cannot read the other: align them with "
                "tfrecords_tools/align.py"
            )
    load_finetune_data(os.path.abspath(finetune_dir))  # names damaged shards
    for method, run_dir in experiment.pretrained.items():
        if method in experiment.methods:
            load_encoder_weights(run_dir, finetune)
    return warnings


# ------------------------------------------------------------------------ encoders


def pretrain_root(experiment: Experiment, out_dir: str) -> str:
    """The folder of the pre-training runs an experiment starts."""
    if experiment.pretrain_dir:
        return experiment.pretrain_dir
    return os.path.join(out_dir, "pretrain", experiment.setting)


def ensure_pretrained(
    spec: PretrainSpec, data_dir: str, root: str, log=print, verbose=0
) -> str:
    """The RUN_DIR of a pre-training run, training (or resuming) it when needed."""
    from keras_ssrl.runs import SUMMARY_JSON, load_run_config
    from keras_ssrl.training import run_pretraining

    run_dir = os.path.join(root, spec.name)
    if os.path.exists(os.path.join(run_dir, SUMMARY_JSON)):
        return run_dir
    config = PretrainConfig(
        method=spec.method,
        epochs=spec.epochs,
        seed=spec.seed,
        pretrain_fraction=spec.q,
        encoder=EncoderConfig(layers=spec.layers, width=spec.width),
    )
    resume = load_run_config(run_dir) is not None
    log(f"pre-training {spec.name}" + (" (resuming)" if resume else ""))
    run_pretraining(config, data_dir, run_dir, resume=resume, verbose=verbose, log=log)
    return run_dir


def default_encoders(experiment: Experiment, out_dir: str) -> dict[str, str]:
    """method -> RUN_DIR of the encoder of each pre-training method of the
    experiment at its default architecture and q = 1 (given or started here)."""
    root = pretrain_root(experiment, out_dir)
    return {
        method: experiment.pretrained.get(method)
        or os.path.join(root, experiment.encoder_spec(method).name)
        for method in SSL_METHODS
        if method in experiment.methods
    }


def pretrain_encoders(experiment: Experiment, out_dir: str, log=print) -> None:
    """Pre-trains (once) the default encoders a label-efficiency sweep lacks.

    Run before its shards start in parallel, so that they find them finished.
    """
    pretrain_data, _ = setting_data(experiment, log=log)
    root = pretrain_root(experiment, out_dir)
    for method in experiment.methods:
        if method in SSL_METHODS and method not in experiment.pretrained:
            ensure_pretrained(experiment.encoder_spec(method), pretrain_data, root, log)


# --------------------------------------------------------------------------- running


def logistic_regression(data: FinetuneData, subset: np.ndarray, seed: int) -> dict:
    """scikit-learn's logistic regression on the standardised genes (same subset).

    L2 penalty with C = 1 (scikit-learn's default) and lbfgs: the classical reference a
    user would otherwise pick. Genes are standardised with the pre-training statistics,
    as for the networks.
    """
    import warnings

    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        # At p = 0.02 there are about as many classes as samples; scikit-learn then
        # warns that `y` "could represent a regression problem". It does not.
        warnings.filterwarnings("ignore", "The number of unique classes")
        model.fit(data.train.x[subset], data.train.y[subset])
    predictions = model.predict(data.test.x)
    return classification_metrics(data.test.y, predictions, len(data.classes))


class Runner:
    """Runs units into a results table, reusing one `Finetuner` per architecture/mode."""

    def __init__(
        self,
        experiment: Experiment,
        out_dir: str,
        log=print,
        verbose=0,
        options: SweepOptions | None = None,
    ):
        self.experiment, self.out_dir, self.log = experiment, out_dir, log
        self.verbose = verbose
        self.options = options or SweepOptions()
        self.pretrain_data, self.finetune_data = setting_data(experiment, log=log)
        self.data = load_finetune_data(os.path.abspath(self.finetune_data))
        self._tuners: dict[tuple[int, int, str], Finetuner] = {}
        self._stacked: dict[tuple[int, int, str], StackedFinetuner] = {}
        self._weights: dict[str, list[np.ndarray]] = {}

    def encoder_run(self, spec: PretrainSpec) -> str:
        """The RUN_DIR of the encoder `spec` names: given, or pre-trained here."""
        e = self.experiment
        default = (spec.layers, spec.width, spec.q) == (e.depths[0], e.widths[0], 1.0)
        given = e.pretrained.get(spec.method)
        if given and default:
            return given
        if given and not default:
            raise ProtocolError(
                f"--pretrained {spec.method}=... is one encoder on the whole "
                f"pre-training set; this experiment needs {spec.name}: use --pretrain"
            )
        root = pretrain_root(self.experiment, self.out_dir)
        return ensure_pretrained(spec, self.pretrain_data, root, self.log, self.verbose)

    def _encoder_weights(self, run_dir: str) -> list[np.ndarray]:
        # One encoder's weights at a time: units are ordered by encoder.
        if run_dir not in self._weights:
            self._weights = {run_dir: load_encoder_weights(run_dir, self.data.manifest)}
        return self._weights[run_dir]

    def _tuner(self, layers: int, width: int, mode: str) -> Finetuner:
        key = (layers, width, mode)
        if key not in self._tuners:
            self._tuners[key] = Finetuner(
                self.data.n_genes,
                len(self.data.classes),
                EncoderConfig(layers=layers, width=width),
                mode,
                self.experiment.finetune,
            )
        return self._tuners[key]

    def _stacked_tuner(self, layers: int, width: int, mode: str) -> StackedFinetuner:
        key = (layers, width, mode)
        if key not in self._stacked:
            self._stacked[key] = StackedFinetuner(
                self.data.n_genes,
                len(self.data.classes),
                EncoderConfig(layers=layers, width=width),
                mode,
                self.experiment.finetune,
            )
        return self._stacked[key]

    def _subset(self, spec: RunSpec) -> tuple[int, np.ndarray]:
        seed = subset_seed(self.experiment.seed, spec.p, spec.repeat)
        return seed, stratified_subset(self.data.train.y, spec.p, seed)

    def run(self, spec: RunSpec, encoder_run: str | None) -> dict:
        """Trains and scores one run; returns its results row."""
        seed, subset = self._subset(spec)
        started = time.perf_counter()
        if spec.method == LOGREG:
            metrics = logistic_regression(self.data, subset, seed)
            return self._row(spec, seed, subset, metrics, 0, 0, started)
        weights = self._encoder_weights(encoder_run) if encoder_run else None
        result = self._tuner(spec.layers, spec.width, _mode(spec)).run(
            self.data, subset, seed, weights, encoder_key=encoder_run
        )
        return self._finish(spec, seed, subset, result, started)

    def run_many(self, specs: list[RunSpec], encoder_run: str | None) -> list[dict]:
        """Trains `specs` (one architecture, mode and encoder) as one stacked model."""
        first = specs[0]
        weights = self._encoder_weights(encoder_run) if encoder_run else None
        subsets = [self._subset(spec) for spec in specs]
        jobs = [
            Job(subset, seed, weights, encoder_key=encoder_run)
            for seed, subset in subsets
        ]
        started = time.perf_counter()
        tuner = self._stacked_tuner(first.layers, first.width, _mode(first))
        results = tuner.run_many(self.data, jobs)
        share = (time.perf_counter() - started) / len(specs)
        return [
            self._finish(spec, seed, subset, result, time.perf_counter() - share)
            for spec, (seed, subset), result in zip(specs, subsets, results)
        ]

    def _finish(self, spec, seed, subset, result: RunResult, started: float) -> dict:
        if self.options.tensorboard:
            write_tensorboard(
                os.path.join(self.out_dir, TENSORBOARD_DIR, "-".join(spec.key)),
                result.history,
            )
        return self._row(
            spec, seed, subset, result.metrics, result.epochs, result.best_epoch,
            started,
        )  # fmt: skip

    def _row(self, spec, seed, subset, metrics, epochs, best, started) -> dict:
        return {
            "setting": spec.setting, "method": spec.method, "mode": spec.mode,
            "architecture": spec.architecture, "q": f"{spec.q:g}", "p": f"{spec.p:g}",
            "repeat": spec.repeat, "seed": seed, "n_train": len(subset),
            "accuracy": f"{metrics['accuracy']:.6f}",
            "balanced_accuracy": f"{metrics['balanced_accuracy']:.6f}",
            "macro_f1": f"{metrics['macro_f1']:.6f}", "epochs": epochs,
            "best_epoch": best, "seconds": f"{time.perf_counter() - started:.3f}",
        }  # fmt: skip


def _done_keys(table: ResultsTable, out_dir: str, shard) -> set[tuple[str, ...]]:
    """Keys of the runs already in the shard's table, or in a merged `results.csv`."""
    done = set(table.keys)
    merged = os.path.join(out_dir, results_name(None))
    if shard is not None and os.path.exists(merged):
        done |= {row_key(r) for r in read_results(merged)}
    return done


def run_experiment(
    experiment: Experiment,
    out_dir: str,
    shard: tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
    progress_stream=None,
    options: SweepOptions | None = None,
) -> str:
    """Runs (or resumes) the experiment's runs of one shard; returns the results path.

    Rows already in the shard's table, or in a merged `results.csv`, are skipped.
    The caller holds `evaluation_lock(out_dir, shard)`.
    """
    check_out(experiment, out_dir)
    units = shard_units(build_units(experiment), shard)
    # Tables are read (and checked) before anything is written.
    table = ResultsTable(os.path.join(out_dir, results_name(shard)))
    done = _done_keys(table, out_dir, shard)
    prepare_out(experiment, out_dir, log=log)
    todo = [(u, r) for u in units for r in u.runs if r.key not in done]
    total = sum(len(u.runs) for u in units)
    label = experiment.kind + (f" shard {shard[0]}/{shard[1]}" if shard else "")
    log(f"{label}: {total} runs, {total - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return table.path
    options = options or SweepOptions()
    runner = Runner(experiment, out_dir, log=log, options=options)
    progress = Progress(len(todo), label, stream=progress_stream)
    encoders: dict[str, str] = {}
    for unit, specs in _batches(todo, options):
        encoder_run = None
        if unit.pretrain is not None:
            if unit.pretrain.name not in encoders:
                encoders[unit.pretrain.name] = runner.encoder_run(unit.pretrain)
            encoder_run = encoders[unit.pretrain.name]
        if len(specs) > 1:
            rows = runner.run_many(specs, encoder_run)
        else:
            rows = [runner.run(specs[0], encoder_run)]
        for spec, row in zip(specs, rows):
            table.append(row)
            progress.update(
                f"{spec.method} {spec.mode} p={spec.p:g} acc {row['accuracy']}"
            )
    return table.path


def _mode(spec: RunSpec) -> str:
    return "unfrozen" if spec.mode == NO_MODE else spec.mode


def _batches(todo, options: SweepOptions):
    """`(unit, specs)` groups of consecutive runs one stacked model can train.

    Runs stack when they share the encoder (the unit's pre-training run, or none),
    the architecture and the mode, up to `options.resolved(mode)` runs; logistic
    regression runs alone.
    """
    group: list = []

    def key(unit, spec):
        encoder = unit.pretrain.name if unit.pretrain is not None else None
        return (encoder, spec.method, spec.layers, spec.width, _mode(spec))

    for unit, spec in todo:
        parallel = options.resolved(_mode(spec))
        alone = parallel == 1 or spec.method == LOGREG
        if group and (
            alone or len(group) >= parallel or key(*group[0]) != key(unit, spec)
        ):
            yield group[0][0], [s for _, s in group]
            group = []
        if alone:
            yield unit, [spec]
        else:
            group.append((unit, spec))
    if group:
        yield group[0][0], [s for _, s in group]
