import logging
import os

import pytest
import torch

# pytest-xdist (pyproject's addopts run the suite on 2 workers): each worker gets its share of
# the cores for torch's own threads, so the workers do not oversubscribe them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def adacorr_log(caplog):
    caplog.set_level(logging.INFO, logger="adacorr_compile")
    return caplog


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ADACORR_SLOW=1 (benchmarks/validate_trust.py);
    CI runs the rest."""
    import os

    if os.environ.get("ADACORR_SLOW", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: run with ADACORR_SLOW=1 (benchmarks/validate_trust.py)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
