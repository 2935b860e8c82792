"""Multi-process start-up: `jax.distributed.initialize()` from flags or the cluster environment.

Every process of a job runs the same command. On a TPU pod slice, under SLURM (`srun`), Open MPI
or with `JAX_COORDINATOR_ADDRESS` set, JAX finds the coordinator, the process count and this
process's id by itself; elsewhere pass them as flags:

    python -m longvid_jax.train --config=... --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=0    # and --process_id=1 on the second host

A single process (no flags, no cluster) starts nothing. CPU-only jobs use gloo collectives.
"""

import os

import jax
from absl import logging

# Variables whose presence (with more than one process) means a multi-process cluster job.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_COUNT_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def in_cluster() -> bool:
    """True when the environment describes a job of several processes."""
    if any(os.environ.get(name) for name in _CLUSTER_ENV):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
        return hosts is None or "," in hosts
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _COUNT_ENV)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts `jax.distributed` if this is one process of several; call before any JAX work.

    Args:
      coordinator_address: "host:port" of process 0; with `num_processes` and `process_id`
        this overrides the environment.
      num_processes: processes in the job.
      process_id: this process's index in [0, num_processes).

    Returns:
      True if a multi-process runtime was started.

    Raises:
      ValueError: only some of the three flags are given.
    """
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    explicit = all(v is not None for v in given)
    if not explicit and not in_cluster():
        return False
    # CPU processes exchange gradients through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
