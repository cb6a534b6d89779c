"""Multi-process runs (one JAX process per host, e.g. Cloud TPU pods): joining the cluster, and
stopping with a clear error when another process dies.

    distributed.initialize()    # Cloud TPU, SLURM, Open MPI: everything detected
    distributed.initialize(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1,
                           heartbeat_timeout_seconds=30)   # anywhere, e.g. 2 processes on localhost

    with distributed.peer_failures_raise():
      ...   # a collective that loses its peer raises PeerProcessError instead of a raw XLA error

Every process runs the same program; collectives (the gradient all-reduce of each train step,
orbax's barriers) need all of them. When one process dies, the others learn it in two ways:
- a collective that was talking to it fails at once (on CPU, Gloo: "Connection reset by peer");
  `peer_failures_raise` turns that into `PeerProcessError`;
- the coordination service (run by process 0) declares it dead after `heartbeat_timeout_seconds`
  without a heartbeat and terminates every other process, logging "The following tasks are
  unhealthy (stopped sending heartbeats): <process ids>" ("Task <id> heartbeat timeout"). A
  process that waits outside any collective (e.g. at a barrier) therefore stops within that
  timeout instead of hanging. When process 0 itself dies, the service goes with it and jax
  terminates the others at once ("Failed to send RPC to coordination service").
Either way the survivors exit with a non-zero status; the checkpoints already finalised stay and
the next run resumes from the latest one (with any number of processes: the data order does not
depend on it, see input_pipeline).
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import jax
from absl import logging

DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 100  # jax.distributed.initialize's default

# Messages of errors that mean another process went away (XLA raises them as ValueError /
# JaxRuntimeError with the runtime's text): a failed Gloo collective, a failed barrier or RPC of
# the coordination service.
_PEER_FAILURE = re.compile(
    r'Gloo .* failed|Connection (reset|closed) by peer|heartbeat timeout|stopped sending '
    r'heartbeats|Barrier failed|coordination service', re.IGNORECASE)


class PeerProcessError(RuntimeError):
  """Another process of a multi-process run stopped (crashed, was killed or preempted)."""


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS) -> None:
  """`jax.distributed.initialize` with cross-process CPU collectives; call before any jax op.

  Args:
    coordinator_address: 'host:port' of process 0 (it starts the coordination service there).
      None: jax reads $JAX_COORDINATOR_ADDRESS, else detects it (Cloud TPU, SLURM, Open MPI).
    num_processes, process_id: None = $JAX_NUM_PROCESSES / $JAX_PROCESS_ID, else detected; give
      all three to run anywhere (the detection is then skipped).
    heartbeat_timeout_seconds: a process silent this long is declared dead and the others are
      stopped (see the module docstring).

  Raises:
    ValueError: process_id not in [0, num_processes), only one of the two given, or nothing
      given and no cluster to detect.
  """
  num_processes = _env_int('JAX_NUM_PROCESSES') if num_processes is None else num_processes
  process_id = _env_int('JAX_PROCESS_ID') if process_id is None else process_id
  if (num_processes is None) != (process_id is None):
    raise ValueError(f'give both num_processes and process_id, or neither (detected); got '
                     f'num_processes={num_processes}, process_id={process_id}')
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id {process_id} not in [0, num_processes={num_processes})')
  if heartbeat_timeout_seconds < 1:
    raise ValueError(f'heartbeat_timeout_seconds must be >= 1, got {heartbeat_timeout_seconds}')
  # XLA:CPU has no cross-process collectives by default; Gloo (TCP) provides them. The setting
  # only concerns the CPU backend, so it is harmless on TPU and GPU hosts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError as error:
    if 'should be defined' not in str(error) and 'must be defined' not in str(error):
      raise
    raise ValueError(
        f'{error} No cluster to detect (Cloud TPU, SLURM, Open MPI): give the coordinator '
        "(process 0's host:port), the process count and this process's id "
        '(--coordinator_address, --num_processes, --process_id, or $JAX_COORDINATOR_ADDRESS, '
        '$JAX_NUM_PROCESSES, $JAX_PROCESS_ID).') from error
  logging.info('JAX process %d of %d (coordinator %s), local devices: %s', jax.process_index(),
               jax.process_count(), coordinator_address or 'detected', jax.local_devices())


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, '')
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'${name} must be an integer, got {value!r}') from None


def is_peer_failure(error: BaseException) -> bool:
  """True when `error` (raised by a collective or barrier) means another process went away."""
  return jax.process_count() > 1 and bool(_PEER_FAILURE.search(str(error)))


@contextlib.contextmanager
def peer_failures_raise(action: str = 'running') -> Iterator[None]:
  """Re-raises errors that mean another process died as `PeerProcessError` (others pass).

  `action` names what this process was doing, for the message (e.g. 'training').
  """
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except  (filtered by is_peer_failure)
    if not is_peer_failure(error):
      raise
    first_line = str(error).strip().splitlines()[0]
    raise PeerProcessError(
        f'process {jax.process_index()} of {jax.process_count()} lost a peer while {action}: '
        f'another process of this run stopped (crashed, was killed or preempted), so the '
        f'collective it was part of failed ({first_line}). This process stops too; the '
        f"coordination service's log names the dead process ('stopped sending heartbeats'). "
        'Restart all processes with the same command: training resumes from the latest '
        'finalised checkpoint.') from error
