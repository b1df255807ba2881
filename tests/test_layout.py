"""The package layout's rules: the core never imports a method package, configs/ or launch/, and
every method package is a sibling that imports the core."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("merging", "svf", "moa", "calm")
NOT_FROM_CORE = METHODS + ("configs", "launch")


def imported_modules(path: Path) -> list[tuple[int, str]]:
  """(line, module) of every import in a file, at any depth (function-level imports count too)."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.append((node.lineno, node.module))
  return out


def test_the_core_imports_no_method_configs_or_launch():
  files = sorted((ROOT / "calm_jax").rglob("*.py"))
  assert len(files) > 20
  bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod in imported_modules(f)
         if mod.split(".")[0] in NOT_FROM_CORE]
  assert not bad, "\n".join(bad)


def test_the_rule_sees_a_function_level_import(tmp_path):
  # the check above must catch what it is for: an import hidden inside a function
  f = tmp_path / "x.py"
  f.write_text("def f():\n  from configs.pretrain import get_config\n  import svf.train\n")
  assert [m for _, m in imported_modules(f)] == ["configs.pretrain", "svf.train"]


@pytest.mark.parametrize("method", METHODS)
def test_method_packages_are_siblings_on_the_core(method):
  pkg = ROOT / method
  assert (pkg / "__init__.py").exists() and not (ROOT / "calm_jax" / method).exists()
  mods = {m.split(".")[0] for f in pkg.rglob("*.py") for _, m in imported_modules(f)}
  assert "calm_jax" in mods
  assert not mods & {"launch", "configs"}, f"{method}/ imports {sorted(mods & {'launch', 'configs'})}"
