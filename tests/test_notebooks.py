"""The notebooks as stored: outputs stripped, the shared setup cell first, the public API only, linked from
README. (Each notebook is executed by its own tests/test_notebook_NAME.py, marked slow.)"""
import re

import nbformat
import pytest

from notebook_exec import NOTEBOOKS, ROOT

NAMES = ("quickstart", "merging", "calm", "transformer2", "moa")
OURS = r"(calm_jax|merging|calm|svf|moa|configs|launch)"


def test_every_notebook_is_there_and_nothing_else():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}.ipynb cell {i} has outputs: strip them"


@pytest.mark.parametrize("name", NAMES)
def test_setup_cell_first_then_public_api(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  setup = code[0]
  for needed in ("google.colab", "pip", "SMOKE = os.environ", "jax.devices()", "CALM_JAX_NOTEBOOK_RUNS"):
    assert needed in setup, f"{name}.ipynb: the first code cell is not the shared setup cell (no {needed!r})"
  assert nb.cells[-1].cell_type == "markdown", f"{name}.ipynb should end with what the reader should see"
  for i, src in enumerate(code):
    private = re.findall(rf"from {OURS}[\w.]* import [^\n]*\b_\w+|\b{OURS}[\w.]*\._\w+", src)
    assert not private, f"{name}.ipynb code cell {i} uses a private name: {private}"
    assert len(src.splitlines()) <= 30, f"{name}.ipynb code cell {i} is {len(src.splitlines())} lines; keep cells short"


def test_readme_and_architecture_name_each_notebook():
  readme = (ROOT / "README.md").read_text()
  for name in NAMES:
    assert f"notebooks/{name}.ipynb" in readme
  assert "notebooks/" in (ROOT / "docs" / "architecture.md").read_text()


def test_an_experiment_chart_leaves_the_sessions_plot_backend_alone(tmp_path):
  """Runs inside a notebook write results.png: that must not switch the kernel's backend (inline plots)."""
  import matplotlib

  from calm_jax.experiment import bar_chart

  old = matplotlib.get_backend()
  matplotlib.use("svg")
  try:
    out = bar_chart(tmp_path / "r.png", {"a": {"x": 0.5, "y": 1.0}}, "t")
    assert matplotlib.get_backend() == "svg"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  finally:
    matplotlib.use(old)
