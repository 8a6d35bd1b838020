"""What the steps of one pre-training run share, as three small dataclasses.

- `RunOptions`: how the caller runs it (resume, distribution, checkpoint period, ...);
- `RunContext`: everything resolved before training (config, data, plan, precision,
  placement, folder), fixed for the run;
- `RunModel`: what is built under the placement's scope (encoder, method, best-weights
  callback, checkpoint), and `ResumePoint`, where training starts.

The driver builds them once; every step takes them instead of a dozen arguments.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from keras_ssrl.config import PretrainConfig
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.training.device_input import InputChoice
from keras_ssrl.training.input import TrainingPlan
from keras_ssrl.training.placement import Placement

if TYPE_CHECKING:  # Keras and TensorFlow are imported once a run starts
    import keras

    from keras_ssrl.callbacks import BestEncoderWeights
    from keras_ssrl.methods.base import PretrainingModel
    from keras_ssrl.training.checkpoints import VariablesCheckpoint

DEFAULT_BUILTIN = "synthetic-tcga"
# Checkpoint period in steps: about a minute of training at 57k genes on a CPU, and
# a negligible cost on small data (epoch ends are always checkpointed as well).
DEFAULT_CHECKPOINT_EVERY = 200


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is carried out (not part of its configuration).

    Attributes:
        resume: continue the run in the folder from its newest checkpoint.
        distribute: `none`, `data-parallel` or `mirrored` (see `placement`).
        cache: `auto`, `device` or `none`: the split on the accelerator (see
            `device_input`).
        checkpoint_every: checkpoint period in steps (0: epoch ends only).
        verbose: Keras `fit` verbosity (`"auto"`, 0, 1, 2).
        log: callable receiving progress lines.
        command: the command line, recorded in `config.json`.
    """

    resume: bool = False
    distribute: str = "none"
    cache: str = "auto"
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    verbose: int | str = "auto"
    log: Callable[[str], None] = print
    command: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class RunContext:
    """One run, resolved: settings, data, sizes and folder.

    Attributes:
        config: the validated `PretrainConfig`.
        options: the `RunOptions`.
        run_dir: the absolute run folder.
        data_dir: the dataset folder (the built-in one's cache folder if `builtin`).
        builtin: the built-in dataset's name, or None.
        manifest: the dataset's `Manifest`.
        subset: the pre-training sample ids used, or None for the whole split.
        precision: the resolved Keras dtype policy.
        placement: the devices (`Placement`) the model lives and trains on.
        plan: the run's `TrainingPlan`.
        input: where training batches come from (`device_input.InputChoice`).
    """

    config: PretrainConfig
    options: RunOptions
    run_dir: str
    data_dir: str
    builtin: str | None
    manifest: Manifest
    subset: list[str] | None
    precision: str
    placement: Placement
    plan: TrainingPlan
    input: InputChoice

    @property
    def log(self) -> Callable[[str], None]:
        return self.options.log

    @property
    def replicas(self) -> int:
        return self.placement.replicas

    def path(self, *names: str) -> str:
        """A path inside the run folder."""
        return os.path.join(self.run_dir, *names)


@dataclasses.dataclass
class RunModel:
    """What the driver builds under the placement's scope.

    Attributes:
        encoder: the encoder being pre-trained.
        model: the method (`Scarf`, `Vime`, `Byol`) around it, compiled.
        best: the callback keeping the best encoder weights.
        checkpoint: a `VariablesCheckpoint` of everything that changes in training.
    """

    encoder: keras.Model
    model: PretrainingModel
    best: BestEncoderWeights
    checkpoint: VariablesCheckpoint


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where training starts: step 0, or a restored checkpoint's step and state.

    Attributes:
        step: the global step training starts from.
        state: the restored checkpoint's `state.json` (empty for a fresh start).
    """

    step: int = 0
    state: dict = dataclasses.field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        return bool(self.state)

    @property
    def seconds(self) -> float:
        """Training seconds of the earlier sessions."""
        return float(self.state.get("seconds", 0.0))
