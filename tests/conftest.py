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


# A trainer config small enough for a test: 2 prompts x 4 samples, 4 sampling steps, no evaluation or logging.
TINY_RUN = ("train.max_steps=2", "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=3",
            "sampling.batch_size=4", "sampling.steps=4", "sampling.guidance=3.0", "run.eval_every=0",
            "run.log_with=none", "run.progress=false", "run.checkpoint_every=1", "train.lr=1e-3")


@pytest.fixture
def tiny_run(tmp_path):
    """tiny_run(*overrides, trainer="flow_grpo", model="tiny-sd3", out=tmp_path) -> a validated trainer config;
    overrides given later win."""
    from visalign.trainers import load_train_config

    def build(*overrides, trainer="flow_grpo", model="tiny-sd3", out=tmp_path):
        return load_train_config(None, [f"trainer={trainer}", f"model.name={model}", f"run.out_dir={out}", *TINY_RUN,
                                        *overrides])

    return build


def pytest_collection_modifyitems(config, items):
    """Tests marked `browser` need Debian's chromium; without it they are skipped, saying how to get it. Tests
    marked `distributed` launch processes that rendezvous on accelerate's default port: under pytest-xdist
    (`-n 2 --dist loadgroup`, the README's test command) they run one after another on one worker."""
    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(pytest.mark.xdist_group("distributed"))
    from visalign.demo.screenshot import chromium

    if chromium() is None:
        skip = pytest.mark.skip(reason="chromium not installed (apt-get install -y chromium)")
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(skip)
