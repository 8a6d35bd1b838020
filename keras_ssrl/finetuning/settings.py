"""What a fine-tuning request may ask: the modes, the baseline's name, the checks.

Owns `MODES`, `BASELINE`, `FinetuneError` (every refusal of the fine-tuning package)
and `validate_finetune_config`, which every entry point (`finetune`, `Finetuner`, the
evaluation protocol) calls before it reads data or writes anything.
"""

from __future__ import annotations

import math

from keras_ssrl.config import FinetuneConfig

MODES = ("frozen", "unfrozen")
# The method name of the non-pre-trained network (recorded in config.json and tables).
BASELINE = "baseline"


class FinetuneError(ValueError):
    """An invalid fine-tuning request (settings, encoder run or output folder)."""


def validate_finetune_config(config: FinetuneConfig) -> None:
    """Checks every fine-tuning setting; raises `FinetuneError` naming it.

    Called before any data is read or anything written. NaN fails every comparison
    below, so it is refused like any other value out of range.
    """
    if config.mode not in MODES:
        raise FinetuneError(
            f"mode must be one of {', '.join(MODES)}, got {config.mode!r}"
        )
    if not 0.0 < config.fraction <= 1.0:
        raise FinetuneError(f"fraction must be in (0, 1], got {config.fraction}")
    for name in ("repeat", "seed"):
        if not getattr(config, name) >= 0:
            raise FinetuneError(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("batch_size", "max_epochs", "patience"):
        if not getattr(config, name) >= 1:
            raise FinetuneError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not 0 < config.learning_rate < math.inf:
        raise FinetuneError(
            f"learning_rate must be a finite number > 0, got {config.learning_rate}"
        )


# The Keras backends with a compiled fine-tuning loop (`loops.py`, `stacked_model.py`).
BACKENDS = ("tensorflow", "jax")


def check_tuner_setup(mode: str, config, what: str = "fine-tuning") -> None:
    """Refuses an unknown mode, an invalid config or an unsupported Keras backend.

    Raises:
        FinetuneError: naming the value and what to do.
    """
    import keras

    if mode not in MODES:
        raise FinetuneError(f"mode must be one of {MODES}, got {mode!r}")
    validate_finetune_config(config)
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise FinetuneError(
            f"{what} runs on the {' and '.join(BACKENDS)} backends of Keras, not "
            f"{backend!r}; set KERAS_BACKEND to one of them"
        )
