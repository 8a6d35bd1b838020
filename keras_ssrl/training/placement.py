"""Where a pre-training run computes: one device, or data parallel over several.

`Placement` hides the one difference between the backends that the driver sees:

- TensorFlow: `--distribute data-parallel` (or its older name `mirrored`) is a
  `tf.distribute.MirroredStrategy` over the GPUs (or the logical CPU devices). Each
  replica runs the step on its slice of the global batch; `keras_ssrl.distribute`
  gathers SCARF's negatives and offsets the corruption counters, and BatchNorm is
  synchronised, so that the step equals the one-device step.
- JAX: `--distribute data-parallel` is `keras.distribution.DataParallel` over every
  device of every process. The step is one program over the global batch that XLA
  partitions, so negatives, corruption draws and BatchNorm statistics are those of one
  device by construction. Several hosts join through `keras.distribution.initialize`
  (JAX's distributed runtime) before the placement is made; see the README, "GPU and
  scale".
"""

from __future__ import annotations

import contextlib
import dataclasses

from keras_ssrl.config import ConfigError

DISTRIBUTE = ("none", "data-parallel", "mirrored")


@dataclasses.dataclass(frozen=True)
class Placement:
    """The devices a run trains on, and the scopes that put the model there.

    Attributes:
        distribute: `none`, `data-parallel` or `mirrored` (TensorFlow only).
        replicas: devices sharing the global batch.
        backend: the Keras backend.
        strategy: the `tf.distribute.Strategy` (TensorFlow), else None.
        distribution: the `keras.distribution.Distribution` (JAX), else None.
        processes: processes (hosts) in the run; `process_index` is this one's.
    """

    distribute: str
    replicas: int
    backend: str
    strategy: object | None = None
    distribution: object | None = None
    processes: int = 1
    process_index: int = 0

    def build_scope(self):
        """The scope variables must be created in."""
        if self.strategy is not None:
            return self.strategy.scope()
        if self.distribution is not None:
            return self.distribution.scope()
        return contextlib.nullcontext()

    def training_scope(self):
        """The scope `fit` runs in: JAX distributes each batch when it is active.

        A TensorFlow model remembers its strategy, so `fit` needs no scope there.
        """
        if self.distribution is not None:
            return self.distribution.scope()
        return contextlib.nullcontext()

    @property
    def row_multiple(self) -> int:
        """Batches must split evenly over JAX's devices; `tf.distribute` splits any."""
        return self.replicas if self.distribution is not None else 1

    @property
    def is_primary(self) -> bool:
        """Whether this process writes the run folder (process 0 of a multi-host run)."""
        return self.process_index == 0


def make_placement(distribute: str) -> Placement:
    """The `Placement` for `distribute` on the running backend.

    Raises:
        ConfigError: an unknown value, or `mirrored` on another backend than
            TensorFlow.
    """
    import keras

    backend = keras.backend.backend()
    if distribute not in DISTRIBUTE:
        raise ConfigError(
            f"distribute must be one of {DISTRIBUTE}, got {distribute!r}", "distribute"
        )
    if backend == "tensorflow":
        import tensorflow as tf

        strategy = (
            tf.distribute.get_strategy()
            if distribute == "none"
            else _mirrored_strategy()
        )
        return Placement(
            distribute, strategy.num_replicas_in_sync, backend, strategy=strategy
        )
    if backend != "jax":
        raise ConfigError(
            f"pre-training runs on the tensorflow or jax backend, not {backend!r}; "
            "set KERAS_BACKEND",
            "distribute",
        )
    if distribute == "mirrored":
        raise ConfigError(
            "--distribute mirrored is TensorFlow's strategy; under KERAS_BACKEND=jax "
            "use --distribute data-parallel",
            "distribute",
        )
    import jax

    processes, index = jax.process_count(), jax.process_index()
    if distribute == "none":
        if processes > 1:
            raise ConfigError(
                f"this is process {index} of {processes}: a multi-host run needs "
                "--distribute data-parallel",
                "distribute",
            )
        return Placement(distribute, 1, backend)
    devices = jax.devices()  # every process's devices: the global mesh
    # Our input pipeline feeds each process its slice of every global batch itself
    # (`keras_ssrl.training.input`): Keras's re-batching would split a short final
    # batch unevenly.
    distribution = keras.distribution.DataParallel(
        devices=devices, auto_shard_dataset=False
    )
    return Placement(
        distribute,
        len(devices),
        backend,
        distribution=distribution,
        processes=processes,
        process_index=index,
    )


def _mirrored_strategy():
    """`MirroredStrategy` over the GPUs, or else over every logical CPU device.

    Without GPUs, TensorFlow's default is one CPU device; several logical CPU devices
    exist only when configured on purpose (`tf.config.set_logical_device_configuration`,
    as tests do to check that the loss does not depend on the number of replicas).
    """
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=cpus)


def join_processes(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[int, int]:
    """Joins a multi-host run under JAX; returns `(process_index, process_count)`.

    Calls `keras.distribution.initialize` (JAX's distributed runtime), which must run
    before JAX touches a device. With no arguments it reads
    `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES` and
    `KERAS_DISTRIBUTION_PROCESS_ID`, or lets JAX detect the cluster (Slurm, ...).
    `--distribute data-parallel` then spans every device of every process.

    Raises:
        ConfigError: not the JAX backend.
    """
    import keras

    if keras.backend.backend() != "jax":
        raise ConfigError(
            "multi-host training runs under KERAS_BACKEND=jax (TensorFlow's "
            "MultiWorkerMirroredStrategy does not work with Keras 3)",
            "coordinator",
        )
    import jax

    # Collectives between CPU processes (tests on one machine); GPUs use NCCL.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=coordinator, num_processes=num_processes, process_id=process_id
    )
    if jax.process_count() > 1:
        _place_variables_across_processes()
    return jax.process_index(), jax.process_count()


def _place_variables_across_processes() -> None:
    """Lets Keras create variables on devices of other processes (JAX < 0.4.31).

    Keras places a new variable with `jax.device_put(value, sharding)`, which the JAX
    release that shares an environment with TensorFlow 2.16 (0.4.30) refuses for a
    sharding spanning several processes. Every process creates the same value (same
    seed), so each can build the global array from its own copy with
    `jax.make_array_from_callback`, which multi-process JAX supports.
    """
    import jax
    import numpy as np
    from keras.src.backend.jax import distribution_lib

    original = distribution_lib.distribute_tensor
    if getattr(original, "_keras_ssrl_multiprocess", False):
        return

    def distribute_tensor(tensor, layout):
        sharding = getattr(layout, "backend_layout", layout)
        if (
            isinstance(sharding, jax.sharding.Sharding)
            and not sharding.is_fully_addressable
            and not isinstance(tensor, jax.core.Tracer)
            and not (isinstance(tensor, jax.Array) and tensor.sharding == sharding)
        ):
            value = np.asarray(tensor)
            return jax.make_array_from_callback(
                value.shape, sharding, lambda index: value[index]
            )
        return original(tensor, layout)

    distribute_tensor._keras_ssrl_multiprocess = True
    distribution_lib.distribute_tensor = distribute_tensor
