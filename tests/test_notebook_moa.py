"""notebooks/moa.ipynb runs headless in SMOKE mode: no cell errors, an image shown, the same numbers twice."""
import pytest

from notebook_exec import check

pytestmark = pytest.mark.slow


def test_moa_notebook(tmp_path):
  check("moa", tmp_path)
