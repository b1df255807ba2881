"""Runs a notebook headless the way `make test` checks it: SMOKE mode, top to bottom twice in one kernel.

`execute(name, runs)` starts one kernel (the environment's `python3`, cwd the repository root, SMOKE=1,
CALM_JAX_NOTEBOOK_RUNS=runs so every file the notebook writes lands under the test's tmp dir), runs every
cell in order, then every cell again in the same kernel, and returns both passes. A cell that raises
fails with the cell's source and the traceback.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@dataclasses.dataclass
class Pass:
  texts: list[str]   # per code cell: its stdout and text/plain results, joined (what a reader reads as numbers)
  images: int        # image/png outputs in the pass


def _collect(nb) -> Pass:
  texts, images = [], 0
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    parts = []
    for out in cell.get("outputs", []):
      if out.output_type == "stream" and out.name == "stdout":
        parts.append(out.text)
      elif out.output_type in ("execute_result", "display_data"):
        data = out.get("data", {})
        images += "image/png" in data
        if "image/png" not in data and "text/plain" in data:
          parts.append(data["text/plain"])
        if "text/html" in data and "text/plain" not in data:
          parts.append(data["text/html"])
    texts.append("".join(parts))
  return Pass(texts, images)


def execute(name: str, runs: Path, timeout: int = 600) -> tuple[Pass, Pass]:
  """Both passes of notebooks/NAME.ipynb in one kernel (SMOKE=1, files under `runs`)."""
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  env = dict(os.environ, SMOKE="1", CALM_JAX_NOTEBOOK_RUNS=str(runs), MPLBACKEND="module://matplotlib_inline.backend_inline")
  env.pop("XLA_FLAGS", None)
  client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
  passes = []
  with client.setup_kernel(env=env, cwd=str(ROOT)):
    for _ in range(2):
      for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
          cell.outputs = []
          client.execute_cell(cell, i)
      passes.append(_collect(nb))
  return passes[0], passes[1]


def check(name: str, runs: Path) -> None:
  """The notebook runs without error, shows at least one image, and its second pass repeats the first's numbers."""
  first, second = execute(name, runs)
  assert first.images >= 1, f"{name}.ipynb showed no image"
  assert second.images == first.images
  for i, (a, b) in enumerate(zip(first.texts, second.texts)):
    assert a == b, f"{name}.ipynb code cell {i} printed different output on the second run:\n{a}\n---\n{b}"
