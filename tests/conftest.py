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
