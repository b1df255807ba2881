"""notebooks/transformer2.ipynb runs headless in SMOKE mode: no cell errors, an image shown, the same numbers twice."""
import pytest

from notebook_exec import check

pytestmark = pytest.mark.slow


def test_transformer2_notebook(tmp_path):
  check("transformer2", tmp_path)
