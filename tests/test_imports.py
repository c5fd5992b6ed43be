"""Imports flow one way: main -> train / evaluate -> model, losses, postprocess, data -> core.

A cycle (evaluate once imported train inside a function, train imports evaluate) makes
a fork's change in one module break the other, and the order of imports matter.
"""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package):
  """{'retina_jax.model.retinanet': its path, ...} for every module of `package` under ROOT."""
  out = {}
  for root, _, names in os.walk(os.path.join(ROOT, package)):
    for name in sorted(names):
      if name.endswith('.py'):
        path = os.path.join(root, name)
        module = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
        out[module.removesuffix('.__init__')] = path
  return out


def import_graph(modules):
  """{module: the modules of `modules` it imports}, from every import statement in its file.

  Imports inside functions count: they are edges all the same, only later.
  """
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imported.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        assert node.level == 0, f'{path}:{node.lineno}: relative import'
        # `from retina_jax import train` names a module; `from retina_jax.x import f` a name in one.
        imported.update(f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
                        for a in node.names)
    graph[module] = {m for m in imported if m in modules and m != module}
  return graph


def find_cycle(graph):
  """[a, b, ..., a]: modules that import each other in a circle; None if there is none."""
  done, path = set(), []

  def visit(module):
    path.append(module)
    for dep in sorted(graph[module]):
      if dep in path:
        return path[path.index(dep):] + [dep]
      if dep not in done:
        cycle = visit(dep)
        if cycle:
          return cycle
    path.pop()
    done.add(module)
    return None

  for module in sorted(graph):
    if module not in done:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def test_every_module_imports_alone_in_a_fresh_interpreter():
  modules = sorted(_modules('retina_jax'))
  code = 'import importlib, sys\nfor m in sys.argv[1:]:\n  importlib.import_module(m)\n'
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, '-c', code, *modules], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_import_graph_has_no_cycle():
  graph = import_graph(_modules('retina_jax'))
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))
  graph['retina_jax.evaluate'].add('retina_jax.train')  # what evaluate_checkpoint once did
  cycle = find_cycle(graph)
  assert cycle[0] == cycle[-1] and set(cycle) == {'retina_jax.evaluate', 'retina_jax.train'}, cycle


def test_only_main_imports_train_and_experiments_load_checkpoints_from_the_package():
  graph = import_graph({**_modules('retina_jax'), **_modules('experiments')})
  assert sorted(m for m, deps in graph.items() if 'retina_jax.train' in deps and m.startswith('retina_jax')) == [
      'retina_jax.main']
  assert 'experiments.run_table' not in graph['experiments.figure4']
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))
