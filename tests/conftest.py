"""Shared pytest set-up.

Tests that need several (simulated) devices run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, because the flag must be set
before jax is imported; `run_with_devices` does that.
"""
import os
import subprocess
import sys
import textwrap

import jax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(*, num_devices: int = 1, env=None) -> dict[str, str]:
  """The environment of a test subprocess: `num_devices` CPU devices, the repo importable."""
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  full_env["JAX_PLATFORMS"] = "cpu"
  full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  if env:
    full_env.update(env)
  return full_env


def run_python(code: str, *, num_devices: int = 1, timeout: float = 600, env=None):
  """Runs `code` in a fresh Python process; returns CompletedProcess (asserts rc 0)."""
  full_env = subprocess_env(num_devices=num_devices, env=env)
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=timeout,
                        env=full_env, cwd=REPO_ROOT)
  assert proc.returncode == 0, (
      f"subprocess failed (rc={proc.returncode})\nstdout:\n{proc.stdout[-4000:]}"
      f"\nstderr:\n{proc.stderr[-8000:]}")
  return proc


@pytest.fixture(params=[False, True], ids=['eager', 'jit'])
def maybe_jit(request):
  """Runs a test with and without jax.jit (the loss modules' tests use both)."""
  return jax.jit if request.param else (lambda fn: fn)


@pytest.fixture
def python_subprocess():
  return run_python


def pytest_collection_modifyitems(config, items):
  """Long checks (`slow`) run first: under `-n 2` the longest test then never starts last while
  the other worker sits idle."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
