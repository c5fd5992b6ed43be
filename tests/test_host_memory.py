"""host_memory: a CPU step reuses the memory its last call freed instead of page-faulting it anew."""

import ctypes
import os
import subprocess
import sys

import pytest

from retina_jax import host_memory

_GLIBC_LINUX = sys.platform == 'linux' and hasattr(ctypes.CDLL(None), 'gnu_get_libc_version')

# A jitted call with hundreds of MB of temporaries (x * 2, its sort, the strided slice), run three
# times in a fresh process that imports the package first; prints each call's page faults.
_CALLS = """
import resource
import retina_jax
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sort(x * 2.0)[::2]))
x = jnp.ones(2**24)
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults_per_call(**env):
  out = subprocess.run([sys.executable, '-c', _CALLS], env={**os.environ, **env}, check=True,
                       capture_output=True, text=True).stdout
  return [int(n) for n in out.split()]


@pytest.mark.skipif(not _GLIBC_LINUX, reason='sets glibc malloc options; other C libraries are left as they are')
def test_a_repeated_call_reuses_its_freed_memory():
  env = {'JAX_PLATFORMS': 'cpu'}
  kept = _page_faults_per_call(**env)
  # The tunables variable is the user's say over malloc, so the package leaves malloc alone.
  default = _page_faults_per_call(GLIBC_TUNABLES='glibc.malloc.perturb=0', **env)
  # ~90k faults a call when every call maps its temporaries anew; the first call pays them either way.
  assert min(default[1:]) > 40_000, default
  assert max(kept[1:]) < 1_000, kept


def test_left_alone_where_the_user_or_an_accelerator_decides(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=4')
  assert not host_memory.keep_freed_memory()
  monkeypatch.delenv('GLIBC_TUNABLES')
  monkeypatch.setattr(host_memory, '_accelerator_plugin_installed', lambda: True)
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  assert not host_memory.keep_freed_memory()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # a GPU host told to run on its CPU gets it
  assert host_memory.keep_freed_memory() == _GLIBC_LINUX
