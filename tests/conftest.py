"""pytest fixtures shared by the tests. Plain shared code (paths, the debug model, running the
trainer, metrics readers) is in helpers.py, which test modules import: `from helpers import ...`."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A corpus cache folder per test module (the corpus is encoded once per module)."""
    return str(tmp_path_factory.mktemp("data"))
