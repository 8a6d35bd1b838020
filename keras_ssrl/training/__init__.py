"""Pre-training: `run_pretraining` turns a `PretrainConfig` and a dataset into a run.

What a run does (optimizer, data order, validation, encoder kept, precision) is told in
docs/protocol.md, "Pre-training".

A run folder (`RUN_DIR`, names in `keras_ssrl.runs`) holds:

- `encoder.keras`: the kept encoder (last or best by validation loss), saved in
  float32 whatever the training precision, loadable with plain Keras;
- `config.json`: the resolved configuration, the data (folder, manifest digest, gene
  count and gene-list digest, subset size), the resolved precision and the run layout;
- `history.csv`: one row per epoch (losses, their components, collapse monitors);
- `logs/`: TensorBoard (`train`, `validation`, and `embeddings` for the projector);
- `checkpoints/`: the two newest training checkpoints (see below);
- `summary.json`: final losses, steps, epochs, time, samples/s, the encoder kept.

Fault tolerance. A checkpoint (`checkpoints.VariablesCheckpoint`, written atomically by
`checkpoints.CheckpointStore`) holds the model (BYOL's target network included), the
optimizer (moments, iteration count, and the loss scale under `mixed_float16`), every
`SeedGenerator` state of the model (corruption, dropout), the best-encoder copy, and
the step. The data order is a pure function of the seed and the epoch (epoch `e` is
shuffled with a seed derived from `(seed, e)`), so a resumed run re-creates the input
of its current epoch and skips the batches already done: it ends at the same step as
an uninterrupted run, with the same batches, corruption and weights. A SIGTERM writes
a checkpoint at the end of the current step and stops (`TrainingInterrupted`);
`scripts/pretrain.py --resume` continues. A SIGTERM that arrives once training has
finished (while the encoder and summary are written) lets the run complete.

One process per run folder: the driver validates every setting, the data and the
folder first (a refused run leaves nothing behind), then holds an exclusive lock on
RUN_DIR (`keras_ssrl.files.FolderLock`) for the whole run; a second process is refused,
naming the holder's PID.

Modules:

- `driver`: `run_pretraining`, as small steps over one `context.RunContext`;
- `context`: the run's options, resolved context, built model and resume point;
- `input`: the pre-training subset, the `TrainingPlan`, training and validation data;
- `rundir`: may this run use the folder (new run, same run to resume), `config.json`;
- `loop`: `fit` from the resume point to the end, and the errors that stop it;
- `checkpoints`: `CheckpointStore`, atomic numbered checkpoints;
- `outputs`: the kept encoder, the projector files, the history, `summary.json`;
- `device_input`: `--cache device`, the split held on the accelerator;
- `placement`: the devices a run trains on (one, or data parallel; either backend);
- `signals`: what a SIGTERM does at each stage of a run.
"""

from keras_ssrl.training.checkpoints import CheckpointStore, VariablesCheckpoint
from keras_ssrl.training.context import DEFAULT_BUILTIN, DEFAULT_CHECKPOINT_EVERY
from keras_ssrl.training.device_input import CACHE_MODES, InputChoice, choose_input
from keras_ssrl.training.driver import resolve_precision, run_pretraining
from keras_ssrl.training.input import (
    COLLAPSE_ROWS,
    SHUFFLE_BUFFER,
    SUBSET_CACHE_BYTES,
    TrainingPlan,
    damaged_data_error,
    make_train_data,
    naming_damaged_shards,
    pretrain_subset,
    steps_per_epoch,
)
from keras_ssrl.training.loop import NonFiniteLossError, TrainingInterrupted
from keras_ssrl.training.outputs import PROJECTOR_ROWS
from keras_ssrl.training.placement import (
    DISTRIBUTE,
    Placement,
    join_processes,
    make_placement,
)
from keras_ssrl.training.rundir import RUN_FILES

__all__ = [
    "COLLAPSE_ROWS",
    "DEFAULT_BUILTIN",
    "DEFAULT_CHECKPOINT_EVERY",
    "CACHE_MODES",
    "DISTRIBUTE",
    "InputChoice",
    "choose_input",
    "Placement",
    "join_processes",
    "make_placement",
    "PROJECTOR_ROWS",
    "RUN_FILES",
    "SHUFFLE_BUFFER",
    "SUBSET_CACHE_BYTES",
    "CheckpointStore",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "TrainingPlan",
    "damaged_data_error",
    "make_train_data",
    "naming_damaged_shards",
    "pretrain_subset",
    "resolve_precision",
    "run_pretraining",
    "VariablesCheckpoint",
    "steps_per_epoch",
]
