"""The paper's reproduction: every sweep of a preset, the collapse spectra, the report.

What runs, with which grids and into which folders, is `keras_ssrl.config`'s
`reproduction_plan(preset)`; this module turns it into experiments, checks all of them
before the first one starts, runs them in order (sharing one folder of pre-training
runs), embeds the label-efficiency encoders for the collapse spectra and writes
`report.md`.
"""

from __future__ import annotations

import dataclasses
import os

from keras_ssrl.config import (
    PRESETS,
    REPRODUCTION_COLLAPSE,
    REPRODUCTION_PRETRAIN,
    FinetuneConfig,
    PretrainConfig,
    Sweep,
    reproduction_plan,
)
from keras_ssrl.evaluation.collapse import run_collapse
from keras_ssrl.evaluation.experiments import (
    DEFAULT_METHODS,
    DEFAULT_MODES,
    Experiment,
    ProtocolError,
)
from keras_ssrl.evaluation.report import write_report
from keras_ssrl.evaluation.results import check_writable_folder
from keras_ssrl.evaluation.runner import default_encoders
from keras_ssrl.evaluation.sweeps import (
    Plan,
    parse_parallelism,
    plan_sweep,
    run_sweep,
)
from keras_ssrl.files import FolderLock


@dataclasses.dataclass(frozen=True)
class Reproduction:
    """What a reproduction is asked for.

    Attributes:
        out: the reproduction folder (each sweep in its sub-folder).
        preset: a key of `keras_ssrl.config.PRESETS`.
        setting: built-in data setting (ignored with `data`).
        data, pretrain_data: converted datasets (fine-tuning, pre-training).
        jobs: parallel fine-tuning processes per sweep.
        repeats: repeats per (method, p) instead of the preset's (None: the preset's).
        finetune: the fine-tuning settings of every run; its seed is every sweep's
            base seed (subsets, initialisations, pre-training).
        pretrain_epochs: epochs of every pre-training run.
    """

    out: str
    preset: str = "quick"
    setting: str = "tcga"
    data: str | None = None
    pretrain_data: str | None = None
    jobs: int = 1
    repeats: int | None = None
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    pretrain_epochs: int = PretrainConfig.epochs

    @property
    def setting_name(self) -> str:
        return "custom" if self.data else self.setting


def experiment_of(request: Reproduction, sweep: Sweep) -> Experiment:
    """The experiment of one sweep of the plan, with the request's settings."""
    data = os.path.abspath(request.data) if request.data else None
    pretrain_data = request.pretrain_data if request.data else None
    return Experiment(
        kind=sweep.kind,
        setting=request.setting_name,
        pretrain_data=os.path.abspath(pretrain_data) if pretrain_data else None,
        finetune_data=data,
        methods=DEFAULT_METHODS[sweep.kind],
        modes=DEFAULT_MODES[sweep.kind],
        fractions=sweep.fractions,
        repeats=sweep.repeats if request.repeats is None else request.repeats,
        depths=sweep.depths,
        widths=sweep.widths,
        pretrain_sizes=sweep.pretrain_sizes,
        pretrain_dir=os.path.join(request.out, REPRODUCTION_PRETRAIN),
        pretrain_epochs=request.pretrain_epochs,
        seed=request.finetune.seed,
        finetune=dataclasses.replace(request.finetune),
    )


def plan_reproduction(request: Reproduction) -> list[Plan]:
    """Checks every sweep's settings, data and folders; writes nothing."""
    if request.preset not in PRESETS:
        raise ProtocolError(
            f"unknown preset {request.preset!r}; choose among {', '.join(PRESETS)}"
        )
    check_writable_folder(request.out)
    if request.pretrain_data and not request.data:
        raise ProtocolError("--pretrain-data needs --data")
    parse_parallelism(request.jobs, None)
    plans = []
    for sweep in reproduction_plan(request.preset):
        out = os.path.join(request.out, sweep.folder)
        plans.append(plan_sweep(experiment_of(request, sweep), out))
    return plans


def _say(message: str) -> None:
    print(message, flush=True)  # in order with the sweeps' worker processes


def reproduce(request: Reproduction, log=_say) -> int:
    """Runs (or resumes) every sweep, the collapse spectra and the report.

    Every sweep is checked before the first one starts; the reproduction folder is
    locked while it runs.

    Returns:
        An exit status: 0, or the first sweep's that was not 0.
    """
    plans = plan_reproduction(request)
    with FolderLock(request.out, "reproduction folder"):
        for plan in plans:
            log(f"== {plan.experiment.kind}")
            for note in plan.notes:
                log("warning: " + note.removeprefix("note: "))
            code = run_sweep(plan, jobs=request.jobs, log=log)
            if code:
                return code
        log(f"== {REPRODUCTION_COLLAPSE}")
        # Figure 4's spectra are of the label-efficiency encoders (q = 1), on the
        # pre-training data (None: the dataset the runs record).
        label_efficiency = next(
            p for p in plans if p.experiment.kind == "label-efficiency"
        )
        experiment = label_efficiency.experiment
        run_collapse(
            default_encoders(experiment, label_efficiency.out),
            experiment.pretrain_data or experiment.finetune_data,
            os.path.join(request.out, REPRODUCTION_COLLAPSE),
            log=log,
            setting=request.setting_name,
        )
        path = write_report(request.out, preset=request.preset,
                            setting=request.setting_name)  # fmt: skip
        log(f"wrote {path}")
    return 0
