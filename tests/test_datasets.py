"""Datasets: protocol splits, real layouts on fabricated trees, the uint8 cache."""
import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from tvtool.datasets import DatasetSpec, get_dataset, load_split, protocol_val_split, register
from tvtool import datasets
from tvtool.datasets import base, cache
from tvtool.errors import TVToolError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TVTOOL_DATA", raising=False)


def color_of(label, k=0):
    """A distinct solid colour per (label, k), so decoded pixels identify their file."""
    return ((37 * label + 11 * k) % 256, (91 * label + 53 * k) % 256, (13 * label + 7 * k + 5) % 256)


def save(path, label, k=0, size=(8, 6), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color_of(label, k)).save(path, format=fmt)


def image_folder_tree(folder, n_classes, per_class, ext=".png", size=(8, 6)):
    for c in range(n_classes):
        for k in range(per_class):
            save(folder / f"class_{c:03d}" / f"img{k:02d}{ext}", c, k, size)


# ---- protocol split ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,expected_val", [(0, 0), (9, 0), (25, 2), (1000, 100), (60000, 5000), (50001, 5000)])
def test_val_split_sizes_disjoint_and_covering(n, expected_val):
    tr, va = protocol_val_split(n)
    assert len(va) == expected_val and len(tr) == n - expected_val
    assert torch.cat([tr, va]).sort().values.equal(torch.arange(n))  # disjoint and union = everything
    tr2, va2 = protocol_val_split(n)
    assert tr.equal(tr2) and va.equal(va2)  # seed 0 is deterministic


def test_val_split_matches_reference_random_split():
    # The reference draws Val with torch.utils.data.random_split and a seed-0 generator.
    from torch.utils.data import random_split

    n = 1234
    n_val = min(int(n * 0.1), 5000)
    ref_tr, ref_va = random_split(range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(0))
    tr, va = protocol_val_split(n)
    assert va.tolist() == sorted(ref_va.indices) and tr.tolist() == sorted(ref_tr.indices)
    assert not protocol_val_split(n, seed=1)[1].equal(va)


# ---- registry ------------------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_known_names():
    with pytest.raises(TVToolError) as e:
        get_dataset("nope")
    msg = str(e.value)
    assert "nope" in msg and all(n in msg for n in ("cars", "dtd", "eurosat", "mnist", "svhn", "imagenet"))


def test_registry_epochs_and_kinds():
    want = {"cars": 35, "dtd": 76, "eurosat": 12, "gtsrb": 11, "mnist": 5, "resisc45": 15, "sun397": 14, "svhn": 4}
    assert {n: get_dataset(n).epochs for n in want} == want
    assert get_dataset("eurosat").native_val and not get_dataset("dtd").native_val
    assert get_dataset("imagenet").control


def test_missing_data_root_and_layout_errors(tmp_path):
    with pytest.raises(TVToolError, match="data-root"):
        load_split("dtd", "train")
    with pytest.raises(TVToolError) as e:
        load_split("dtd", "test", data_root=tmp_path)
    assert str(tmp_path / "dtd" / "val") in str(e.value) and "tvtool data prepare dtd" in str(e.value)
    with pytest.raises(TVToolError, match="unknown split"):
        load_split("dtd", "validation", data_root=tmp_path)


# ---- preprocessing -------------------------------------------------------------------------------------------------

def test_preprocess_is_resize_short_side_bicubic_then_center_crop():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    got = cache.preprocess(img, 12)
    # Independent: PIL directly. Short side 30 -> 12, long side int(12 * 50 / 30) = 20, centre crop 12 of 20.
    ref = img.resize((20, 12), Image.BICUBIC)
    left = int(round((20 - 12) / 2.0))
    ref = np.asarray(ref.crop((left, 0, left + 12, 12))).transpose(2, 0, 1)
    assert got.dtype == np.uint8 and got.shape == (3, 12, 12)
    assert np.array_equal(got, ref)
    grey = cache.preprocess(Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)), 12)
    assert grey.shape == (3, 12, 12) and np.array_equal(grey[0], grey[2])


# ---- ImageFolder-style layout (DTD) ------------------------------------------------------------------------------

def test_dtd_layout_labels_order_and_splits(tmp_path):
    n_cls = len(get_dataset("dtd").classnames)  # class count must match the class-name file
    image_folder_tree(tmp_path / "dtd" / "train", n_cls, 3)
    image_folder_tree(tmp_path / "dtd" / "val", n_cls, 1)
    x_tr, y_tr = load_split("dtd", "train", tmp_path, image_size=4)
    x_va, y_va = load_split("dtd", "val", tmp_path, image_size=4)
    x_te, y_te = load_split("dtd", "test", tmp_path, image_size=4)
    n = 3 * n_cls
    n_val = int(n * 0.1)
    assert (len(y_tr), len(y_va), len(y_te)) == (n - n_val, n_val, n_cls)
    assert x_tr.dtype == torch.uint8 and x_tr.shape == (n - n_val, 3, 4, 4)
    # Listing order is class-major, file-sorted: example i is (class i // 3, file i % 3); val = seed-0 indices.
    tr_idx, va_idx = protocol_val_split(n)
    for x, y, idx in ((x_tr, y_tr, tr_idx), (x_va, y_va, va_idx)):
        assert y.tolist() == (idx // 3).tolist()
        want = torch.tensor([color_of(int(i) // 3, int(i) % 3) for i in idx], dtype=torch.uint8)
        assert x[:, :, 2, 2].equal(want)  # solid images: every pixel is the file's colour
    assert y_te.tolist() == list(range(n_cls))


def test_class_count_mismatch_is_an_error(tmp_path):
    image_folder_tree(tmp_path / "dtd" / "val", 3, 1)
    with pytest.raises(TVToolError, match="found 3 classes"):
        load_split("dtd", "test", tmp_path, image_size=4)


# ---- EuroSAT's own val --------------------------------------------------------------------------------------------

def test_eurosat_native_val(tmp_path):
    root = tmp_path / "EuroSAT_splits"
    image_folder_tree(root / "train", 10, 4, ext=".jpg")
    image_folder_tree(root / "val", 10, 2, ext=".jpg")
    image_folder_tree(root / "test", 10, 3, ext=".jpg")
    sizes = {s: len(load_split("eurosat", s, tmp_path, image_size=4)[1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 40, "val": 20, "test": 30}  # nothing held out of train: val is its own folder
    assert load_split("eurosat", "val", tmp_path, image_size=4)[1].tolist() == [c for c in range(10) for _ in range(2)]


# ---- RESISC45 split lists -----------------------------------------------------------------------------------------

def test_resisc45_split_files(tmp_path):
    base_dir = tmp_path / "resisc45"
    names = {"train": [], "test": []}
    for c in range(45):
        for k in range(4):
            fname = f"c{c:02d}_{k}.jpg"
            save(base_dir / "NWPU-RESISC45" / f"class_{c:02d}" / fname, c, k, fmt="PNG")  # lossless despite .jpg
            names["test" if k == 3 else "train"].append(fname)
    for split, lst in names.items():
        (base_dir / f"resisc45-{split}.txt").write_text("\n".join(lst) + "\n")
    (base_dir / "resisc45-val.txt").write_text("")
    x_te, y_te = load_split("resisc45", "test", tmp_path, image_size=4)
    assert y_te.tolist() == list(range(45))
    assert x_te[:, :, 1, 1].equal(torch.tensor([color_of(c, 3) for c in range(45)], dtype=torch.uint8))
    _, y_tr = load_split("resisc45", "train", tmp_path, image_size=4)
    _, y_va = load_split("resisc45", "val", tmp_path, image_size=4)
    assert len(y_tr) + len(y_va) == 135 and len(y_va) == 13


# ---- MNIST idx ---------------------------------------------------------------------------------------------------

def write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    rng = np.random.default_rng(1)
    raw = tmp_path / "MNIST" / "raw"
    suffix = ".gz" if gz else ""
    train = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    test_labels = np.arange(7) % 10
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", train, gz)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", np.arange(30) % 10, gz)
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", test, gz)
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", test_labels, gz)
    x, y = load_split("mnist", "test", tmp_path, image_size=28)
    assert y.tolist() == test_labels.tolist()
    # 28 -> 28 is no resize: grey pixels copied into all three channels.
    assert x.equal(torch.from_numpy(test)[:, None].expand(-1, 3, -1, -1))
    x_tr, y_tr = load_split("mnist", "train", tmp_path, image_size=28)
    tr_idx, _ = protocol_val_split(30)
    assert y_tr.tolist() == (tr_idx % 10).tolist() and x_tr[:, 0].equal(torch.from_numpy(train)[tr_idx])


def test_mnist_truncated_idx_is_an_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    p = raw / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(TVToolError, match="truncated"):
        load_split("mnist", "test", tmp_path, image_size=28)


# ---- Cars .mat, SVHN .mat, GTSRB csv -----------------------------------------------------------------------------

def test_cars_devkit_annotations(tmp_path):
    import scipy.io

    base_dir = tmp_path / "stanford_cars"
    (base_dir / "devkit").mkdir(parents=True)
    scipy.io.savemat(base_dir / "devkit" / "cars_meta.mat", {"class_names": np.array([f"car {i}" for i in range(196)], dtype=object)})
    rec = np.dtype([("class", "O"), ("fname", "O")])
    test = np.array([(5, "00002.jpg"), (1, "00001.jpg"), (196, "00003.jpg")], dtype=rec)
    scipy.io.savemat(base_dir / "cars_test_annos_withlabels.mat", {"annotations": test})
    for i, (cls, fname) in enumerate(test.tolist()):
        save(base_dir / "cars_test" / fname, cls, fmt="JPEG")
    _, y = load_split("cars", "test", tmp_path, image_size=4)
    assert y.tolist() == [4, 0, 195]  # class id - 1, annotation order


def test_svhn_label_ten_is_zero(tmp_path):
    import scipy.io

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": y})
    imgs, labels = load_split("svhn", "test", tmp_path, image_size=32)
    assert labels.tolist() == [0, 1, 2, 0, 9]
    assert imgs.equal(torch.from_numpy(x).permute(3, 2, 0, 1))


def test_gtsrb_training_folders_and_test_csv(tmp_path):
    base_dir = tmp_path / "gtsrb" / "GTSRB"
    for c in range(43):
        save(base_dir / "Training" / f"{c:05d}" / f"{c:05d}_00000.ppm", c, fmt="PPM")
    (base_dir / "Training" / "00000" / "GT-00000.csv").write_text("ignored")  # not a .ppm
    imgs = base_dir / "Final_Test" / "Images"
    rows = [("00000.ppm", 7), ("00001.ppm", 0), ("00002.ppm", 42)]
    for f, c in rows:
        save(imgs / f, c, fmt="PPM")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + "".join(f"{f};8;6;0;0;8;6;{c}\n" for f, c in rows)
    )
    x, y = load_split("gtsrb", "test", tmp_path, image_size=4)
    assert y.tolist() == [7, 0, 42] and x[:, :, 0, 0].equal(torch.tensor([color_of(c) for _, c in rows], dtype=torch.uint8))
    _, y_tr = load_split("gtsrb", "train", tmp_path, image_size=4)
    _, y_va = load_split("gtsrb", "val", tmp_path, image_size=4)
    assert sorted(y_tr.tolist() + y_va.tolist()) == list(range(43)) and len(y_va) == 4


# ---- cache ---------------------------------------------------------------------------------------------------------

def count_preprocess(monkeypatch):
    calls = {"n": 0}
    real = cache.preprocess

    def counting(img, size):
        calls["n"] += 1
        return real(img, size)

    monkeypatch.setattr(cache, "preprocess", counting)
    return calls


def eurosat_tree(tmp_path, per_class=2):
    for s in ("train", "val", "test"):
        image_folder_tree(tmp_path / "EuroSAT_splits" / s, 10, per_class)


def test_cache_hit_decodes_nothing(tmp_path, monkeypatch):
    eurosat_tree(tmp_path)
    calls = count_preprocess(monkeypatch)
    x1, y1 = load_split("eurosat", "test", tmp_path, image_size=4)
    assert calls["n"] == 20
    x2, y2 = load_split("eurosat", "test", tmp_path, image_size=4)
    assert calls["n"] == 20 and x1.equal(x2) and y1.equal(y2)
    assert cache.cache_path("eurosat", "test", 4).is_file()
    load_split("eurosat", "test", tmp_path, image_size=6)  # another resolution is another cache
    assert calls["n"] == 40


def test_stale_or_foreign_cache_is_rebuilt(tmp_path, monkeypatch):
    eurosat_tree(tmp_path)
    calls = count_preprocess(monkeypatch)
    load_split("eurosat", "test", tmp_path, image_size=4)
    # A new file in the split changes the key: rebuilt with it.
    save(tmp_path / "EuroSAT_splits" / "test" / "class_000" / "zz.png", 0, 9)
    x, y = load_split("eurosat", "test", tmp_path, image_size=4)
    assert calls["n"] == 20 + 21 and len(y) == 21
    # A foreign file (another key) and a damaged file: both rebuilt, never trusted.
    path = cache.cache_path("eurosat", "test", 4)
    cache.write_cache(path, "someone-else", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1))
    assert load_split("eurosat", "test", tmp_path, image_size=4)[0].equal(x)
    path.write_bytes(b"garbage")
    assert load_split("eurosat", "test", tmp_path, image_size=4)[0].equal(x)
    assert calls["n"] == 41 + 2 * 21
    # The preprocessing version is part of the key.
    monkeypatch.setattr(cache, "PREPROCESS_VERSION", "something-new")
    load_split("eurosat", "test", tmp_path, image_size=4)
    assert calls["n"] == 41 + 3 * 21


def test_corrupt_image_skipped_and_counted(tmp_path, caplog):
    image_folder_tree(tmp_path / "EuroSAT_splits" / "test", 10, 11)  # 110 images
    bad = tmp_path / "EuroSAT_splits" / "test" / "class_004" / "img03.png"
    bad.write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING, logger="tvtool.datasets"):
        x, y = load_split("eurosat", "test", tmp_path, image_size=4)
    assert len(y) == 109 and "skipped 1 of 110" in caplog.text and "img03.png" in caplog.text
    # Labels stay aligned with images: every remaining image has its own class's colour.
    keep = [(c, k) for c in range(10) for k in range(11) if (c, k) != (4, 3)]
    assert y.tolist() == [c for c, _ in keep]
    assert x[:, :, 0, 0].equal(torch.tensor([color_of(c, k) for c, k in keep], dtype=torch.uint8))
    bad2 = tmp_path / "EuroSAT_splits" / "test" / "class_005" / "img00.png"
    bad2.write_bytes(b"")
    with pytest.raises(TVToolError, match="more than 1%"):
        load_split("eurosat", "test", tmp_path, image_size=4)


def test_loader_only_dataset_cached_and_split(tmp_path):
    calls = {"n": 0}

    def loader(split, data_root, image_size):
        calls["n"] += 1
        n = 50 if split == "train" else 7
        images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, image_size, image_size)
        return images.clone(), torch.arange(n) % 5

    register(DatasetSpec(name="test-fake-mini", loader=loader, kind="mini", needs_data_root=False))
    try:
        x_tr, y_tr = load_split("test-fake-mini", "train", image_size=2)
        x_va, y_va = load_split("test-fake-mini", "val", image_size=2)
        load_split("test-fake-mini", "train", image_size=2)
        assert calls["n"] == 1  # one full-train call produced both protocol parts
        tr, va = protocol_val_split(50)
        assert x_tr[:, 0, 0, 0].tolist() == tr.tolist() and y_va.tolist() == (va % 5).tolist()
        load_split("test-fake-mini", "test", image_size=2)
        load_split("test-fake-mini", "test", image_size=2)
        assert calls["n"] == 2
    finally:
        base._REGISTRY.pop("test-fake-mini")


# ---- empty data and invalid caches (issue 9) ----------------------------------------------------------------------

def test_empty_class_folder_is_refused_by_name(tmp_path):
    image_folder_tree(tmp_path / "EuroSAT_splits" / "test", 10, 2)
    for f in (tmp_path / "EuroSAT_splits" / "test" / "class_007").iterdir():
        f.unlink()
    with pytest.raises(TVToolError, match="class_007 has no images"):
        load_split("eurosat", "test", tmp_path, image_size=4)


def test_empty_training_split_is_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
    with pytest.raises(TVToolError, match="mnist: the train split .* has no examples"):
        load_split("mnist", "train", tmp_path, image_size=28)
    with pytest.raises(TVToolError, match="has no examples"):
        datasets.check_available("mnist", ["train"], tmp_path)


@pytest.mark.parametrize("damage", ["size", "count", "dtype", "labels"])
def test_cache_with_right_key_but_wrong_content_is_rebuilt(tmp_path, monkeypatch, damage):
    eurosat_tree(tmp_path)
    calls = count_preprocess(monkeypatch)
    x, y = load_split("eurosat", "test", tmp_path, image_size=4)
    path = cache.cache_path("eurosat", "test", 4)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        key = f.metadata()["key"]
    bad_x, bad_y = x.clone(), y.clone()
    if damage == "size":
        bad_x = torch.zeros(len(y), 3, 5, 5, dtype=torch.uint8)
    elif damage == "count":
        bad_x, bad_y = torch.cat([x, x]), torch.cat([y, y])
    elif damage == "dtype":
        bad_x = x.float()
    else:
        bad_y[0] = 99  # EuroSAT has 10 classes
    from safetensors.torch import save_file

    save_file({"images": bad_x.contiguous(), "labels": bad_y.contiguous()}, str(path), {"key": key})
    x2, y2 = load_split("eurosat", "test", tmp_path, image_size=4)
    assert x2.equal(x) and y2.equal(y)
    assert calls["n"] == 2 * len(y)  # decoded again, the bad file was not used
