"""FusionBench's Hugging Face parquet snapshots (issue 22), on fabricated files: read from a folder under the data
root and from the local hub cache, decoded through the same opener and preprocessing as the folder layouts, class
order checked, Val carved as the protocol says, and `tvtool data check / prepare` aware of them."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from tvtool.datasets import get_dataset, load_split, protocol_val_split  # noqa: E402
from tvtool.datasets import cache, hf  # noqa: E402
from tvtool.errors import TVToolError  # noqa: E402

from cli_helpers import run_tvtool  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TVTOOL_DECODE_WORKERS", "1")
    monkeypatch.delenv("TVTOOL_DATA", raising=False)


def colour(label, k):
    return ((37 * label + 11 * k) % 256, (91 * label + 53 * k) % 256, (13 * label + 7 * k + 5) % 256)


def png(label, k, size=(9, 7)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour(label, k)).save(buf, format="PNG")
    return buf.getvalue()


def write_split(folder, split, labels, names, *, shards=2, row_group=7, cells=None):
    """data/<split>-0000k-of-0000n.parquet as `datasets` writes them: image struct {bytes, path} + int label, the
    features (ClassLabel names) in the schema's `huggingface` metadata."""
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    schema = pa.schema([("image", image_t), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    cells = cells or [{"bytes": png(y, k), "path": f"{k}.png"} for k, y in enumerate(labels)]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(labels), shards + 1).astype(int)
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        table = pa.table({"image": cells[a:b], "label": list(labels[a:b])}, schema=schema)
        pq.write_table(table, folder / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet", row_group_size=row_group)


def dtd_snapshot(folder, n_train=94, n_test=47):
    names = get_dataset("dtd").classnames
    write_split(folder, "train", [i % 47 for i in range(n_train)], names)
    write_split(folder, "test", [i % 47 for i in range(n_test)], names)
    return names


def expected_pixels(labels, size):
    return torch.stack([torch.from_numpy(cache.preprocess(Image.open(io.BytesIO(png(y, k))), size).copy())
                        for k, y in enumerate(labels)])


def test_snapshot_under_the_data_root_reads_like_a_folder_layout(tmp_path):
    dtd_snapshot(tmp_path / "data" / "tanganke" / "dtd")
    x, y = load_split("dtd", "test", tmp_path / "data", image_size=4)
    labels = [i % 47 for i in range(47)]
    assert y.tolist() == labels
    assert x.equal(expected_pixels(labels, 4))  # same opener, same preprocessing as a folder's PNGs
    # Val is 10% of the snapshot's train split (seed 0), in the snapshot's row order
    tr, va = protocol_val_split(94)
    _, y_tr = load_split("dtd", "train", tmp_path / "data", image_size=4)
    x_va, y_va = load_split("dtd", "val", tmp_path / "data", image_size=4)
    assert y_tr.tolist() == [i % 47 for i in tr.tolist()] and y_va.tolist() == [i % 47 for i in va.tolist()]
    assert x_va[:, :, 0, 0].tolist() == [list(colour(i % 47, i)) for i in va.tolist()]


def test_snapshot_in_the_hub_cache_needs_no_data_root(tmp_path):
    repo = tmp_path / "hub" / "datasets--tanganke--dtd"
    old = repo / "snapshots" / ("0" * 40)
    dtd_snapshot(old, n_test=5)  # an older revision: not the one refs/main names
    rev = "a1b2c3d4" * 5
    staged = tmp_path / "staged"
    dtd_snapshot(staged)
    for f in (staged / "data").iterdir():  # the hub cache keeps files as blobs, linked from each snapshot
        blob = repo / "blobs" / f.name
        blob.parent.mkdir(parents=True, exist_ok=True)
        f.rename(blob)
        (repo / "snapshots" / rev / "data").mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / rev / "data" / f.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    _, y = load_split("dtd", "test", None, image_size=4)
    assert len(y) == 47
    from tvtool.datasets import check_available

    check_available("dtd", ("train", "val", "test"))  # and no data root asked for


def test_folder_layout_wins_over_a_snapshot(tmp_path):
    dtd_snapshot(tmp_path / "tanganke" / "dtd")
    names = sorted(f"class_{c:02d}" for c in range(47))
    for c, name in enumerate(names):
        folder = tmp_path / "dtd" / "val" / name
        folder.mkdir(parents=True)
        Image.new("RGB", (5, 5), (c, 0, 0)).save(folder / "a.png")
    x, _ = load_split("dtd", "test", tmp_path, image_size=4)
    assert x[:, 0, 0, 0].tolist() == list(range(47))


def test_class_order_differing_from_tvtools_is_one_line(tmp_path):
    names = list(get_dataset("dtd").classnames)
    names[3], names[5] = names[5], names[3]
    write_split(tmp_path / "tanganke" / "dtd", "test", [0, 1, 2], names)
    with pytest.raises(TVToolError) as err:
        load_split("dtd", "test", tmp_path, image_size=4)
    msg = str(err.value)
    assert "\n" not in msg and "class 3 as 'chequered'" in msg and "tvtool's class 5" in msg and "'bubbly'" in msg
    assert "templates/dtd.yaml" in msg


def test_class_names_spelt_differently_pass(tmp_path):
    # FusionBench-style folder names against tvtool's rewritten EuroSAT names: same order, other spelling
    folder_names = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                    "PermanentCrop", "Residential", "River", "SeaLake"]
    snap = tmp_path / "tanganke" / "eurosat"
    write_split(snap, "train", [i % 10 for i in range(100)], folder_names)
    write_split(snap, "test", [i % 10 for i in range(20)], folder_names)
    # EuroSAT has its own Val folder; this snapshot has no validation split, so Val is carved from train
    sizes = {s: len(load_split("eurosat", s, tmp_path, image_size=4)[1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 90, "val": 10, "test": 20}
    write_split(snap, "validation", [i % 10 for i in range(30)], folder_names)
    sizes = {s: len(load_split("eurosat", s, tmp_path, image_size=4)[1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 100, "val": 30, "test": 20}
    wrong = list(folder_names)
    wrong[0], wrong[1] = wrong[1], wrong[0]
    write_split(tmp_path / "other" / "tanganke" / "eurosat", "test", [0], wrong)
    with pytest.raises(TVToolError, match="lists class 0 as 'Forest', which is tvtool's class 1"):
        load_split("eurosat", "test", tmp_path / "other", image_size=4)


def test_damaged_snapshots_are_one_line(tmp_path, caplog):
    names = get_dataset("dtd").classnames
    root = tmp_path / "r1"
    write_split(root / "tanganke" / "dtd", "test", [47, 0], names)
    with pytest.raises(TVToolError, match="labels 0..47, tvtool's dtd has classes 0..46"):
        load_split("dtd", "test", root, image_size=4)
    root = tmp_path / "r2"
    (root / "tanganke" / "dtd" / "data").mkdir(parents=True)
    (root / "tanganke" / "dtd" / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TVToolError, match="unreadable parquet file"):
        load_split("dtd", "test", root, image_size=4)
    # a cell that only names a file (no embedded bytes) is an unreadable example, skipped like a corrupt image
    root = tmp_path / "r3"
    labels = [i % 47 for i in range(141)]
    cells = [{"bytes": png(y, k), "path": f"{k}.png"} for k, y in enumerate(labels)]
    cells[100] = {"bytes": None, "path": "/etc/passwd"}
    write_split(root / "tanganke" / "dtd", "test", labels, names, cells=cells)
    with caplog.at_level("WARNING", logger="tvtool.datasets"):
        _, y = load_split("dtd", "test", root, image_size=4)
    assert len(y) == 140 and "skipped 1 of 141" in caplog.text and "#" in caplog.text


def test_without_pyarrow_the_way_out_is_named(tmp_path, monkeypatch):
    dtd_snapshot(tmp_path / "tanganke" / "dtd")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(TVToolError, match="needs pyarrow; install it with `pip install pyarrow`"):
        load_split("dtd", "test", tmp_path, image_size=4)


def test_worker_processes_read_the_snapshot_alike(tmp_path, monkeypatch):
    dtd_snapshot(tmp_path / "tanganke" / "dtd", n_test=200)
    x1, y1 = load_split("dtd", "test", tmp_path, image_size=4)
    monkeypatch.setenv("TVTOOL_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("TVTOOL_DECODE_WORKERS", "2")
    x2, y2 = load_split("dtd", "test", tmp_path, image_size=4)
    assert x1.equal(x2) and y1.equal(y2)


def test_every_snapshot_task_is_registered_with_matching_class_count():
    for task, repo in hf.SNAPSHOTS.items():
        assert repo.startswith("tanganke/") and get_dataset(task).kind == "real"


def test_cli_check_finds_the_snapshot_and_prepare_says_how_to_get_it(tmp_path):
    dtd_snapshot(tmp_path / "tanganke" / "dtd")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    r = run_tvtool("data", "check", "dtd", "--data-root", tmp_path, "--json", env=env)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["datasets"][0]
    assert row["present"] and row["counts"] == {"train": 85, "val": 9, "test": 47}
    assert row["source"].startswith("Hugging Face snapshot")
    r = run_tvtool("data", "prepare", "sun397", "--data-root", tmp_path / "empty", env=env)  # no partition files
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "hf download tanganke/sun397 --repo-type dataset --local-dir" in r.stderr
    assert f"{tmp_path / 'empty'}/tanganke/sun397" in r.stderr
    r = run_tvtool("data", "prepare", "cars", "--data-root", tmp_path / "empty", env=env)  # manual steps only
    assert r.returncode == 1 and "Manual steps" in r.stdout
    assert "Or use FusionBench's Hugging Face snapshot: `hf download tanganke/stanford_cars" in r.stdout
