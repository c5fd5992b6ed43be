"""The make targets run with glibc's malloc on huge pages, and that takes a repeated call's page faults away."""

import os
import platform
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _thp_mode():
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return 'never'


def _glibc_version():
  libc, version = platform.libc_ver()
  return tuple(int(n) for n in version.split('.')[:2]) if libc == 'glibc' else (0, 0)


# A jitted call with ~200 MB of temporaries (x * 2, its sort, the strided slice), run four times in a
# fresh process; prints each call's minor page faults.
_CALLS = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sort(x * 2.0)[::2]))
x = jnp.ones(2**24)
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults_per_call(tunables):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': tunables}
  out = subprocess.run([sys.executable, '-c', _CALLS], env=env, check=True, capture_output=True, text=True)
  return [int(n) for n in out.stdout.split()]


def test_the_make_targets_export_the_malloc_tunable():
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  out = subprocess.run(['make', '-s', '--no-print-directory', '-C', _REPO, '--eval',
                        'show-tunables: ; @echo "$$GLIBC_TUNABLES"', 'show-tunables'],
                       env=env, check=True, capture_output=True, text=True).stdout
  assert out.strip() == 'glibc.malloc.hugetlb=1'


@pytest.mark.skipif(sys.platform != 'linux' or _glibc_version() < (2, 35) or _thp_mode() == 'never',
                    reason='glibc.malloc.hugetlb needs glibc 2.35+ and transparent huge pages')
def test_huge_pages_take_a_repeated_calls_page_faults_away():
  small = _page_faults_per_call('glibc.malloc.perturb=0')  # any glibc.malloc tunable but hugetlb
  huge = _page_faults_per_call('glibc.malloc.hugetlb=1')
  # The first call also maps the compiled code; from the second on only the temporaries fault
  # (~90k on 4 KiB pages, ~1k on 2 MiB ones).
  assert max(huge[1:]) * 10 < min(small[1:]), (huge, small)
