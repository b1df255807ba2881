"""notebooks/quickstart.ipynb runs headless in SMOKE mode: no cell errors, an image shown, the same numbers twice."""
import pytest

from notebook_exec import check

pytestmark = pytest.mark.slow


def test_quickstart_notebook(tmp_path):
  check("quickstart", tmp_path)
