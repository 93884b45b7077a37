import os

import pytest
import torch

# Two cores: oversubscribed threads make CPU timings 3-10x slower and erratic.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_sd3():
    from visalign.models.tiny import tiny_sd3

    return tiny_sd3(0)


@pytest.fixture
def tiny_flux():
    from visalign.models.tiny import tiny_flux

    return tiny_flux(0)


@pytest.fixture
def tiny_wan():
    from visalign.models.tiny import tiny_wan

    return tiny_wan(0)
