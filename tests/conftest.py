import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep tests off the user's ~/.cache/tvtool and off the network."""
    os.environ["TVTOOL_CACHE"] = str(tmp_path_factory.mktemp("tvtool-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
