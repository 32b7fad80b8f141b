import logging

import pytest
import torch


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
