"""Multi-process runs on JAX's own runtime (``jax.distributed``).

The ensemble's model axis is embarrassingly parallel, so scaling past one
machine needs only three things, all provided by JAX itself:

1. every process joins one runtime (:func:`initialize`), after which
   ``jax.devices()`` lists the devices of *all* processes;
2. host arrays that every process holds identically (the plan, the client
   data) become global arrays sharded over that global mesh
   (:func:`to_global`);
3. results come back to every host (:func:`to_host`), and only process 0
   writes files (:func:`is_main_process`).

On one process (2) and (3) reduce to ``jax.device_put`` and ``np.asarray``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    initialization_timeout: int | None = None,
) -> None:
  """Joins this process to a multi-process JAX runtime.

  With no arguments JAX detects the cluster (SLURM, Cloud TPU, Open MPI,
  Kubernetes). With explicit arguments all three must be given. On CPU the
  collectives go through gloo, and ``local_device_count`` (when given) sets
  how many CPU devices this process exposes, which lets tests run a
  multi-process mesh on one machine.

  Must run before any other JAX computation in the process.

  Args:
    coordinator_address: ``"host:port"`` of process 0.
    initialization_timeout: seconds to wait for every process to join (None:
      JAX's default, 300). When they do not, JAX *ends the process* with a
      fatal error (SIGABRT), which no Python code can catch; see
      ``cli.start_runtime`` for a watchdog that ends it with one line first.

  Raises:
    ValueError: only some of the explicit arguments are given, a coordinator
      address that is not ``host:port``, or ``num_processes``/``process_id``
      out of range.
  """
  for name, value in (("num_processes", num_processes), ("process_id", process_id),
                      ("local_device_count", local_device_count),
                      ("initialization_timeout", initialization_timeout)):
    if value is not None and (isinstance(value, (bool, np.bool_))
                              or not isinstance(value, (int, np.integer))):
      raise TypeError(f"{name} must be an integer, got {value!r}")
  if coordinator_address is not None and (
      not isinstance(coordinator_address, str) or not coordinator_address.strip()):
    raise TypeError(
        f"coordinator_address must be a non-empty 'host:port' string, got {coordinator_address!r}")
  if coordinator_address is not None:
    check_coordinator(coordinator_address)
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError(
        "give all of coordinator_address, num_processes and process_id, or none of them "
        "(to auto-detect SLURM/TPU/MPI)")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  if initialization_timeout is not None and initialization_timeout < 1:
    raise ValueError(f"initialization_timeout must be >= 1 second, got {initialization_timeout}")
  if local_device_count is not None:
    if local_device_count < 1:
      raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")
    jax.config.update("jax_num_cpu_devices", local_device_count)
  # CPU backends need a collectives implementation to talk across processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = {} if initialization_timeout is None else \
      {"initialization_timeout": int(initialization_timeout)}
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      **timeout,
  )


def check_coordinator(address: str) -> tuple[str, int]:
  """Splits ``"host:port"`` (``"[::1]:port"`` for IPv6).

  Raises:
    ValueError: no host, or a port that is not an integer in [1, 65535].
  """
  host, colon, port = address.strip().rpartition(":")
  if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(f"the coordinator address must be host:port with a port in [1, 65535] "
                     f"(e.g. 10.0.0.1:1234), got {address!r}")
  return host, int(port)


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_main_process() -> bool:
  """True on the one process that writes results (process 0)."""
  return jax.process_index() == 0


def to_global(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Places a host array, identical on every process, with ``sharding``.

  ``make_array_from_callback`` hands each device only its own shard and,
  unlike ``device_put``, also builds arrays spanning devices of other
  processes; on one process it is the same as ``device_put``.
  """
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(array: jax.Array) -> np.ndarray:
  """Fetches a (possibly multi-process, sharded) array whole onto every host."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def broadcast_int(value: int) -> int:
  """Process 0's ``value`` on every process (``value`` itself on one process).

  Sent as two uint32 words: without jax_enable_x64 an int64 would be cut to
  32 bits on the way.

  Args:
    value: an integer in [0, 2**64).
  """
  if not is_multiprocess():
    return int(value)
  words = np.array([int(value) >> 32, int(value) & 0xFFFFFFFF], np.uint32)
  hi, lo = np.asarray(multihost_utils.broadcast_one_to_all(words)).astype(np.uint64)
  return int(hi) << 32 | int(lo)


def env_flag_distributed() -> bool:
  """True when the environment asks for a multi-process run (ENSEMBLE_FL_DISTRIBUTED=1)."""
  return os.environ.get("ENSEMBLE_FL_DISTRIBUTED", "") not in ("", "0", "false", "False")
