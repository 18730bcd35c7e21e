import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep tests off the user's ~/.cache/tvtool and off the network."""
    os.environ["TVTOOL_CACHE"] = str(tmp_path_factory.mktemp("tvtool-cache"))
    # an empty Hugging Face cache: dataset snapshots a developer has downloaded must not stand in for missing data
    os.environ["HF_HUB_CACHE"] = str(tmp_path_factory.mktemp("hf-hub-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


def pytest_configure(config):
    # xdist runs one worker per core: torch's own intra-op threads on top would oversubscribe the machine
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
