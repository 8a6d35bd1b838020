"""Fine-tuning: one routine for the non-pre-trained baseline, frozen and unfrozen encoders.

A classifier is the shared MLP encoder plus one `Dense(n_classes)` head producing logits;
`Finetuner` trains it on a stratified labelled subset with Adam, batch 8, early stopping
on the validation loss, and restores the best epoch (docs/protocol.md, "Fine-tuning").
The package sits in the training layer: it reads the data layer and pre-training runs,
never the evaluation protocol (which drives it for its sweeps).

Modules:

- `settings`: `MODES`, `BASELINE`, `FinetuneError`, `validate_finetune_config`.
- `data`: the labelled splits in memory (`load_finetune_data`), the dataset checks
  (`check_labelled_splits`), the stratified subsets (`subset_seed`,
  `stratified_subset`) and the check of a subset's indices (`check_subset`).
- `model`: `build_classifier` and the pre-trained encoder (`pretraining_record`,
  `encoder_config_of`, `load_encoder_weights`).
- `initialization`: initial weights drawn with NumPy, the same on every backend
  (`reinitialize`, `reseed`).
- `loops`: the epochs of one run, one loop per Keras backend (`TensorFlowLoop`,
  `JaxLoop`, `TrainState`).
- `trainer`: `Finetuner`, the loop that reuses its graphs across thousands of small runs,
  and `classification_metrics`.
- `stacked_ops`, `stacked_model`, `stacked`: many runs trained at once as one stacked
  model (`StackedFinetuner`, `Job`).
- `run`: `finetune`, one run written to a run folder (`scripts/finetune.py`).

Example:

```python
from keras_ssrl.finetuning import finetune

metrics = finetune("data/tcga", "runs/ft-scarf", encoder_run="runs/scarf")
```
"""

from keras_ssrl.finetuning.data import (
    FINETUNE_SPLITS,
    FinetuneData,
    LabelledSplit,
    check_labelled_splits,
    check_subset,
    load_finetune_data,
    stratified_subset,
    subset_seed,
)
from keras_ssrl.finetuning.model import (
    build_classifier,
    encoder_config_of,
    load_encoder_weights,
    pretraining_record,
)
from keras_ssrl.finetuning.run import FINETUNE_FILES, finetune
from keras_ssrl.finetuning.settings import (
    BASELINE,
    MODES,
    FinetuneError,
    validate_finetune_config,
)
from keras_ssrl.finetuning.stacked import Job, StackedFinetuner
from keras_ssrl.finetuning.trainer import (
    Finetuner,
    RunResult,
    classification_metrics,
)

__all__ = [
    "BASELINE",
    "FINETUNE_FILES",
    "FINETUNE_SPLITS",
    "MODES",
    "FinetuneData",
    "FinetuneError",
    "Finetuner",
    "Job",
    "LabelledSplit",
    "RunResult",
    "StackedFinetuner",
    "build_classifier",
    "check_labelled_splits",
    "check_subset",
    "classification_metrics",
    "encoder_config_of",
    "finetune",
    "load_encoder_weights",
    "load_finetune_data",
    "pretraining_record",
    "stratified_subset",
    "subset_seed",
    "validate_finetune_config",
]
