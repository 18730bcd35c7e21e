import os
import subprocess
import sys
import zipfile

import pytest

FUSIONBENCH_VERSION = "0.2.33"  # the peer whose merge code tests/test_merge_peers, _merge_data, _adamerging run


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


@pytest.fixture(scope="session")
def fusionbench_src(tmp_path_factory):
    """FusionBench's wheel from the package registry, unpacked once per test process (never installed): the folder
    holding its ``fusion_bench`` package, whose pure-tensor modules the peer tests load by path. Skips when the
    registry cannot be reached."""
    where = tmp_path_factory.mktemp("fusionbench")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                        f"fusion-bench=={FUSIONBENCH_VERSION}", "-d", str(where)], capture_output=True, text=True,
                       timeout=300)
    wheels = list(where.glob("fusion_bench-*.whl"))
    if r.returncode != 0 or not wheels:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the package registry did not give fusion-bench=={FUSIONBENCH_VERSION} (pip download: {tail})")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(where / "src")
    return where / "src"
