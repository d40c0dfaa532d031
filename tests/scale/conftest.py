import pytest

from scale import helpers


@pytest.fixture(scope="session")
def gloo2():
    """Per-rank results of helpers.worker_all on 2 gloo processes (computed once)."""
    return helpers.run_workers(helpers.worker_all, 2)
