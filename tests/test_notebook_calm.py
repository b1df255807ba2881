"""notebooks/calm.ipynb runs headless in SMOKE mode: no cell errors, an image shown, the same numbers twice."""
import pytest

from notebook_exec import check

pytestmark = pytest.mark.slow


def test_calm_notebook(tmp_path):
  check("calm", tmp_path)
