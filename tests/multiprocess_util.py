"""Runs N JAX processes of one multi-process run on localhost, as a pod's hosts would run.

    results = run_processes(CODE, num_processes=2, timeout=180)

Each process is a fresh `python` (the environment of conftest.subprocess_env) that learns its
place from $JAX_COORDINATOR_ADDRESS (localhost and a free port), $JAX_NUM_PROCESSES and
$JAX_PROCESS_ID, which `cgl_jax.distributed.initialize()` reads. Every process runs in its own
process group, and whatever is still running when the call returns (timeout, failure, Ctrl-C) is
killed with its group, so no test leaves processes behind.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence

from conftest import REPO_ROOT, subprocess_env


@dataclasses.dataclass
class ProcessResult:
  process_id: int
  returncode: int | None  # None: still running at the timeout (then killed)
  stdout: str
  stderr: str
  seconds: float


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it right after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def _describe(results: Sequence[ProcessResult]) -> str:
  return '\n'.join(f'--- process {r.process_id}: rc={r.returncode} after {r.seconds:.0f} s\n'
                   f'stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-6000:]}' for r in results)


def run_processes(program: str | Callable[[int, str], Sequence[str]], *, num_processes: int,
                  timeout: float, num_devices: int = 1, env: dict[str, str] | None = None,
                  check: bool = True) -> list[ProcessResult]:
  """Runs the processes of one run to completion (or `timeout` seconds for all of them).

  Args:
    program: Python code (run with `python -c`), or (process id, coordinator address) → the
      arguments after `python` (e.g. ['-m', 'cgl_jax.main', '--distributed', …]).
    num_processes: how many processes; they share one coordinator on a free localhost port.
    timeout: seconds for the whole run; then every process still running is killed.
    num_devices: CPU devices per process.
    env: extra environment variables (all processes).
    check: raise AssertionError, with every process's output, unless all exit with 0.

  Returns:
    One ProcessResult per process, by process id.
  """
  coordinator = f'localhost:{free_port()}'
  processes, logs = [], []
  start = time.monotonic()
  finished = {}
  try:
    for process_id in range(num_processes):
      args = (['-c', textwrap.dedent(program)] if isinstance(program, str)
              else list(program(process_id, coordinator)))
      process_env = subprocess_env(num_devices=num_devices, env={
          **(env or {}), 'JAX_COORDINATOR_ADDRESS': coordinator,
          'JAX_NUM_PROCESSES': str(num_processes), 'JAX_PROCESS_ID': str(process_id)})
      # Files, not pipes: a process blocked on a full pipe would stall the whole run.
      out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
      logs.append((out, err))
      processes.append(subprocess.Popen([sys.executable, *args], stdout=out, stderr=err,
                                        env=process_env, cwd=REPO_ROOT, text=True,
                                        start_new_session=True))
    while len(finished) < num_processes and time.monotonic() - start < timeout:
      for process_id, process in enumerate(processes):
        if process_id not in finished and process.poll() is not None:
          finished[process_id] = time.monotonic() - start
      time.sleep(0.2)
  finally:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
  results = []
  for process_id, (out, err) in enumerate(logs):
    out.seek(0)
    err.seek(0)
    done = process_id in finished
    results.append(ProcessResult(process_id=process_id,
                                 returncode=processes[process_id].returncode if done else None,
                                 stdout=out.read(), stderr=err.read(),
                                 seconds=finished.get(process_id, time.monotonic() - start)))
    out.close()
    err.close()
  if check and any(result.returncode != 0 for result in results):
    raise AssertionError(f'a process failed or timed out ({timeout} s)\n{_describe(results)}')
  return results
