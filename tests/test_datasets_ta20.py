"""The 14- and 20-task benchmarks: every new layout on a fabricated tree (read like torchvision reads it), the
protocol splits, the cited class/template counts, and the ta8/ta14/ta20 suites in the CLI and in recipes."""
import gzip
import json
import pickle
import struct
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cli_helpers import run_tvtool
from tvtool.datasets import SUITES, get_dataset, load_split, resolve_tasks
from tvtool.errors import TVToolError

NEW = ["flowers102", "pcam", "fer2013", "oxfordiiitpet", "stl10", "cifar100",
       "cifar10", "food101", "fashionmnist", "emnist", "kmnist", "renderedsst2"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TVTOOL_DATA", raising=False)


def color_of(label, k=0):
    return ((37 * label + 11 * k) % 256, (91 * label + 53 * k) % 256, (13 * label + 7 * k + 5) % 256)


def save_png(path, label, k=0, size=(6, 5)):
    """A solid image saved losslessly (PNG bytes whatever the extension: PIL reads by content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color_of(label, k)).save(path, format="PNG")


def assert_same_as_torchvision(name, split, root, tv_dataset):
    """Our listing of a native split equals torchvision's dataset on the same files: order, labels and pixels."""
    listing = get_dataset(name).listing(split, root)
    assert len(listing) == len(tv_dataset) > 0
    for i in range(len(tv_dataset)):
        tv_img, tv_label = tv_dataset[i]
        assert int(listing.labels[i]) == tv_label, (name, i)
        ours = listing.open(i)
        assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(tv_img.convert("RGB"))), (name, i)
    return listing


def split_sizes(name, root):
    return {s: len(load_split(name, s, root, image_size=4)[1]) for s in ("train", "val", "test")}


# ---- cited class and template counts ---------------------------------------------------------------------------

# (classes, templates) as in nik-dim/tall_masks src/datasets/*.py + templates.py and
# tanganke/fusion_bench fusion_bench/tasks/clip_classification/*.py (see the header of each templates YAML).
CITED = {"flowers102": (102, 1), "pcam": (2, 1), "fer2013": (7, 6), "oxfordiiitpet": (37, 1), "stl10": (10, 2),
         "cifar100": (100, 18), "cifar10": (10, 18), "food101": (101, 1), "fashionmnist": (10, 2), "emnist": (10, 1),
         "kmnist": (10, 1), "renderedsst2": (2, 1)}
# TALL masks finetune.py `epochs` (batch 128, lr 1e-5, the same recipe as the 8 tasks).
EPOCHS = {"flowers102": 147, "pcam": 1, "fer2013": 10, "oxfordiiitpet": 82, "stl10": 60, "cifar100": 6, "cifar10": 6,
          "food101": 4, "fashionmnist": 5, "emnist": 2, "kmnist": 5, "renderedsst2": 39}
NATIVE_VAL = {"flowers102", "pcam", "renderedsst2"}


@pytest.mark.parametrize("name", NEW)
def test_cited_counts_epochs_and_val_convention(name):
    spec = get_dataset(name)
    assert (len(spec.classnames), len(spec.templates)) == CITED[name]
    assert len(set(spec.classnames)) == len(spec.classnames)
    assert spec.epochs == EPOCHS[name] and spec.native_val == (name in NATIVE_VAL)
    assert spec.prepare is not None or name == "fer2013"  # FER2013 sits behind a Kaggle login
    assert spec.layout_help and spec.kind == "real"


def test_class_names_spot_checks():
    # Label order matters: spot checks against the sources' label semantics.
    assert get_dataset("fer2013").classnames[4] == "sad" and get_dataset("fer2013").classnames[6] == "neutral"
    assert get_dataset("cifar100").classnames[26] == "crab"  # FusionBench's copy has the typo 'cra'
    assert get_dataset("oxfordiiitpet").classnames[:2] == ["Abyssinian", "American Bulldog"]
    assert get_dataset("food101").classnames[16:18] == ["cheese_plate", "cheesecake"]  # sorted folder names
    assert get_dataset("flowers102").prompts("rose") == ["a photo of a rose, a type of flower."]


# ---- suites ------------------------------------------------------------------------------------------------------

def test_suites_expand_in_fusionbench_order():
    ta8 = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert resolve_tasks("ta8") == ta8
    assert resolve_tasks("ta14") == ta8 + NEW[:6]
    assert resolve_tasks("TA20") == ta8 + NEW
    assert [len(set(SUITES[s])) for s in ("ta8", "ta14", "ta20")] == [8, 14, 20]
    assert resolve_tasks("ta8, cifar10 ,mnist") == ta8 + ["cifar10"]  # duplicates kept once
    assert resolve_tasks(["cifar10", "ta8"]) == ["cifar10"] + ta8


@pytest.mark.parametrize("bad,says", [("ta9", "unknown dataset 'ta9'"), ("ta8,nope", "'nope'"), (",", "no tasks"),
                                      ([], "no tasks"), ([3], "must be strings")])
def test_resolve_tasks_errors(bad, says):
    with pytest.raises(TVToolError, match=says) as e:
        resolve_tasks(bad)
    if "unknown" in says:
        assert "ta14" in str(e.value) and "cifar100" in str(e.value)


def test_eval_accepts_a_suite(tmp_path):
    # Without the data the run stops at the first task of the expanded suite (sun397), not at the name 'ta14'.
    r = run_tvtool("eval", "accuracy", "--tasks", "ta14", "--model", "tvtool-mini", "--data-root", str(tmp_path),
                env={"TVTOOL_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "sun397" in r.stderr and "ta14" not in r.stderr and "Traceback" not in r.stderr
    r = run_tvtool("eval", "accuracy", "--tasks", "ta14,bogus", "--model", "tvtool-mini", "--data-root", str(tmp_path))
    assert r.returncode == 1 and "unknown dataset 'bogus'" in r.stderr and "ta20" in r.stderr


def test_recipes_accept_suites(tmp_path):
    from tvtool.recipes import load_recipe

    def recipe(tasks):
        p = tmp_path / "r.yaml"
        p.write_text(textwrap.dedent(f"""\
            model: tvtool-mini
            out_dir: {tmp_path / 'out'}
            tasks: {tasks}
            variants: [{{name: ft, mode: full}}]
        """))
        return load_recipe(p)

    assert recipe("ta14").tasks == list(SUITES["ta14"])
    assert recipe("[ta8, cifar10]").tasks == list(SUITES["ta8"]) + ["cifar10"]
    with pytest.raises(TVToolError, match=r"tasks\.1.*unknown dataset 'nope'"):
        recipe("[ta8, nope]")


def test_shipped_suite_recipes():
    from pathlib import Path

    from tvtool.recipes import load_recipe

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for n in (8, 14, 20):
        r = load_recipe(recipes / f"ta{n}.yaml")
        assert r.tasks == list(SUITES[f"ta{n}"]) and len(r.tasks) == n


# ---- image-file layouts ------------------------------------------------------------------------------------------

def test_flowers102_setid_and_native_val(tmp_path, monkeypatch):
    import scipy.io

    base = tmp_path / "flowers-102"
    n_cls, labels, sets = 102, [], {"trnid": [], "valid": [], "tstid": []}
    for c in range(n_cls):
        for k, key in enumerate(sets):
            image_id = 3 * c + k + 1
            labels.append(c + 1)
            sets[key].append(image_id)
            save_png(base / "jpg" / f"image_{image_id:05d}.jpg", c, k)
    sets["tstid"].reverse()  # setid order, not id order, is the example order
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    scipy.io.savemat(base / "setid.mat", {k: np.array(v) for k, v in sets.items()})
    monkeypatch.setattr(torchvision.datasets.Flowers102, "_check_integrity", lambda self: True)
    for ours, theirs in (("train", "train"), ("val", "val"), ("test", "test")):
        assert_same_as_torchvision("flowers102", ours, tmp_path, torchvision.datasets.Flowers102(tmp_path, split=theirs))
    assert get_dataset("flowers102").listing("test", tmp_path).labels.tolist() == list(range(101, -1, -1))
    assert split_sizes("flowers102", tmp_path) == {"train": 102, "val": 102, "test": 102}  # own val: nothing held out


def test_oxfordiiitpet_annotations(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    breeds = get_dataset("oxfordiiitpet").classnames
    lines = {"trainval": [], "test": []}
    for c, breed in enumerate(breeds):
        stem = breed.replace(" ", "_") if c else breed  # cat breeds are capitalised in the image ids
        for k, split in enumerate(("trainval", "trainval", "test")):
            image_id = f"{stem}_{k + 1}"
            save_png(base / "images" / f"{image_id}.jpg", c, k)
            lines[split].append(f"{image_id} {c + 1} {1 + c % 2} {k + 1}")
    for split, rows in lines.items():
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    tv = torchvision.datasets.OxfordIIITPet(tmp_path, split="trainval")
    assert_same_as_torchvision("oxfordiiitpet", "train", tmp_path, tv)
    assert tv.classes[:2] == breeds[:2]  # torchvision derives the same names from the ids
    assert_same_as_torchvision("oxfordiiitpet", "test", tmp_path, torchvision.datasets.OxfordIIITPet(tmp_path, split="test"))
    assert split_sizes("oxfordiiitpet", tmp_path) == {"train": 74 - 7, "val": 7, "test": 37}
    (base / "annotations" / "test.txt").write_text("Abyssinian_1 99 1 1\n")
    with pytest.raises(TVToolError, match="outside 1..37"):
        get_dataset("oxfordiiitpet").listing("test", tmp_path)


def test_food101_json_order_and_sorted_labels(tmp_path):
    base = tmp_path / "food-101"
    classes = get_dataset("food101").classnames
    meta = {"train": {}, "test": {}}
    for c in reversed(range(len(classes))):  # json order differs from the sorted label order
        for k, split in enumerate(("train", "test")):
            rel = f"{classes[c]}/{1000 + k}"
            meta[split][classes[c]] = [rel]
            save_png(base / "images" / f"{rel}.jpg", c, k)
    (base / "meta").mkdir()
    for split, entries in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(entries))
    listing = assert_same_as_torchvision("food101", "test", tmp_path, torchvision.datasets.Food101(tmp_path, split="test"))
    assert listing.labels.tolist() == list(range(100, -1, -1))
    assert split_sizes("food101", tmp_path) == {"train": 91, "val": 10, "test": 101}


def test_renderedsst2_native_val(tmp_path):
    base = tmp_path / "rendered-sst2"
    for folder, n in (("train", 5), ("valid", 2), ("test", 3)):
        for c, cls in enumerate(("negative", "positive")):
            for k in range(n):
                save_png(base / folder / cls / f"{k}.png", c, k)
    for ours, theirs in (("train", "train"), ("val", "val"), ("test", "test")):
        assert_same_as_torchvision("renderedsst2", ours, tmp_path, torchvision.datasets.RenderedSST2(tmp_path, split=theirs))
    assert split_sizes("renderedsst2", tmp_path) == {"train": 10, "val": 4, "test": 6}


# ---- array layouts -----------------------------------------------------------------------------------------------

def test_stl10_binary_orientation(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    base = tmp_path / "stl10_binary"
    base.mkdir()
    for split, n in (("train", 20), ("test", 10)):
        rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tofile(base / f"{split}_X.bin")
        (np.arange(n, dtype=np.uint8) % 10 + 1).tofile(base / f"{split}_y.bin")
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    for split in ("train", "test"):  # the H/W transposition must match torchvision's
        assert_same_as_torchvision("stl10", split, tmp_path, torchvision.datasets.STL10(tmp_path, split=split))
    x, y = load_split("stl10", "test", tmp_path, image_size=96)
    ref = torchvision.datasets.STL10(tmp_path, split="test")
    assert y.tolist() == list(range(10)) and x[3].permute(1, 2, 0).numpy().tobytes() == ref[3][0].tobytes()
    assert split_sizes("stl10", tmp_path) == {"train": 18, "val": 2, "test": 10}
    (base / "test_y.bin").write_bytes(b"\x01")
    with pytest.raises(TVToolError, match="do not hold"):
        get_dataset("stl10").listing("test", tmp_path)


def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, monkeypatch, name):
    rng = np.random.default_rng(4)
    n_cls = 10 if name == "cifar10" else 100
    key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n, offset):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: [(offset + i) % n_cls for i in range(n)]}

    if name == "cifar10":
        base, cls = tmp_path / "cifar-10-batches-py", torchvision.datasets.CIFAR10
        for i in range(1, 6):
            _pickle(base / f"data_batch_{i}", batch(4, 4 * i))
        _pickle(base / "test_batch", batch(6, 0))
        _pickle(base / "batches.meta", {"label_names": get_dataset(name).classnames})
        sizes = {"train": 18, "val": 2, "test": 6}
    else:
        base, cls = tmp_path / "cifar-100-python", torchvision.datasets.CIFAR100
        _pickle(base / "train", batch(30, 7))
        _pickle(base / "test", batch(6, 0))
        _pickle(base / "meta", {"fine_label_names": get_dataset(name).classnames})
        sizes = {"train": 27, "val": 3, "test": 6}
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # meta md5
    for split in ("train", "test"):
        tv = cls(tmp_path, train=split == "train")
        assert_same_as_torchvision(name, split, tmp_path, tv)
    assert tv.classes == get_dataset(name).classnames
    assert split_sizes(name, tmp_path) == sizes


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder,prefix,cls", [
    ("fashionmnist", "FashionMNIST", "{}", "FashionMNIST"),
    ("kmnist", "KMNIST", "{}", "KMNIST"),
    ("emnist", "EMNIST", "emnist-digits-{}", "EMNIST"),
])
def test_mnist_family_idx(tmp_path, name, folder, prefix, cls):
    rng = np.random.default_rng(5)
    raw = tmp_path / folder / "raw"
    for split, tv_split, n in (("train", "train", 30), ("test", "t10k" if name != "emnist" else "test", 7)):
        stem = prefix.format(tv_split)
        write_idx(raw / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{stem}-labels-idx1-ubyte", (np.arange(n) * 3) % 10)
    kw = {"split": "digits"} if name == "emnist" else {}
    for split in ("train", "test"):
        tv = getattr(torchvision.datasets, cls)(tmp_path, train=split == "train", **kw)
        assert_same_as_torchvision(name, split, tmp_path, tv)
    assert split_sizes(name, tmp_path) == {"train": 27, "val": 3, "test": 7}
    if name == "emnist":  # .gz next to nothing else is accepted too
        p = raw / "emnist-digits-test-labels-idx1-ubyte"
        p.with_suffix(".gz").write_bytes(gzip.compress(p.read_bytes()))
        p.unlink()
        assert len(get_dataset(name).listing("test", tmp_path)) == 7
    write_idx(raw / f"{prefix.format('t10k' if name != 'emnist' else 'test')}-labels-idx1-ubyte", np.full(7, 12))
    with pytest.raises(TVToolError, match="outside 0..9"):
        get_dataset(name).listing("test", tmp_path)


def _fer_rows(rng):
    rows = []
    for usage, n in (("Training", 20), ("PublicTest", 3), ("PrivateTest", 4)):
        for i in range(n):
            pixels = " ".join(map(str, rng.integers(0, 256, 48 * 48)))
            rows.append(((i * 5) % 7, pixels, usage))
    rows.insert(5, rows.pop(-1))  # usages interleaved: selection is by the Usage column, file order kept
    return rows


@pytest.mark.parametrize("fname", ["fer2013.csv", "icml_face_data.csv"])
def test_fer2013_csv(tmp_path, monkeypatch, fname):
    rows = _fer_rows(np.random.default_rng(6))
    (tmp_path / "fer2013").mkdir()
    if fname == "fer2013.csv":
        text = "emotion,pixels,Usage\n" + "".join(f"{e},{p},{u}\n" for e, p, u in rows)
    else:
        text = "emotion, Usage, pixels\n" + "".join(f"{e},{u},{p}\n" for e, p, u in rows)
    (tmp_path / "fer2013" / fname).write_text(text)
    monkeypatch.setattr(torchvision.datasets.fer2013, "check_integrity", lambda *a, **k: True)
    for split in ("train", "test"):
        assert_same_as_torchvision("fer2013", split, tmp_path, torchvision.datasets.FER2013(tmp_path, split=split))
    # test = PublicTest + PrivateTest (torchvision's and the published runs' test); Val = 10% of Training.
    assert split_sizes("fer2013", tmp_path) == {"train": 18, "val": 2, "test": 7}
    x, y = load_split("fer2013", "test", tmp_path, image_size=48)
    first = np.array(rows[5][1].split(), dtype=np.uint8).reshape(48, 48)  # the moved PrivateTest row comes first
    assert y[0] == rows[5][0] and x[0, 1].numpy().tobytes() == first.tobytes()


def test_fer2013_unlabelled_kaggle_split_is_explained(tmp_path):
    (tmp_path / "fer2013").mkdir()
    (tmp_path / "fer2013" / "train.csv").write_text("emotion,pixels\n")
    with pytest.raises(TVToolError, match="no labels; get fer2013.csv"):
        get_dataset("fer2013").listing("test", tmp_path)
    pixels = " ".join(["1"] * 48 * 48)
    (tmp_path / "fer2013" / "fer2013.csv").write_text(f"emotion,pixels,Usage\n3,{pixels},Training\n"
                                                      f"happy,{pixels},Training\n")
    with pytest.raises(TVToolError, match=r"fer2013.csv:3: emotion 'happy' is not a label"):
        get_dataset("fer2013").listing("train", tmp_path)
    (tmp_path / "fer2013" / "fer2013.csv").unlink()
    (tmp_path / "fer2013" / "train.csv").unlink()
    with pytest.raises(TVToolError, match="fer2013.csv.*tvtool data prepare fer2013"):
        get_dataset("fer2013").listing("train", tmp_path)


def test_pcam_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py -> ImportError
    with pytest.raises(TVToolError, match="camelyonpatch_level_2_split_train_x.h5.*tvtool data prepare pcam"):
        get_dataset("pcam").listing("train", tmp_path)  # no files: say where they go first
    for part in ("x", "y"):
        (tmp_path / "pcam").mkdir(exist_ok=True)
        (tmp_path / "pcam" / f"camelyonpatch_level_2_split_train_{part}.h5").write_bytes(b"")
    with pytest.raises(TVToolError, match=r"^pcam: .*needs h5py; install it with `pip install h5py`$"):
        get_dataset("pcam").listing("train", tmp_path)


def test_pcam_h5(tmp_path):
    h5py = pytest.importorskip("h5py")  # optional dependency
    rng = np.random.default_rng(7)
    base = tmp_path / "pcam"
    base.mkdir()
    for split, n in (("train", 10), ("valid", 4), ("test", 6)):
        stem = base / f"camelyonpatch_level_2_split_{split}"
        with h5py.File(f"{stem}_x.h5", "w") as f:
            f["x"] = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        with h5py.File(f"{stem}_y.h5", "w") as f:
            f["y"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
    for ours, theirs in (("train", "train"), ("val", "val"), ("test", "test")):
        assert_same_as_torchvision("pcam", ours, tmp_path, torchvision.datasets.PCAM(tmp_path, split=theirs))
    assert split_sizes("pcam", tmp_path) == {"train": 10, "val": 4, "test": 6}


# ---- data list / prepare -------------------------------------------------------------------------------------------

def test_data_list_shows_the_new_tasks(capsys):
    from tvtool.cli import main

    assert main(["data", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: (rows[n]["classes"], rows[n]["templates"], rows[n]["epochs"]) for n in NEW} == {
        n: (*CITED[n], EPOCHS[n]) for n in NEW}


@pytest.mark.parametrize("name,cls", [("cifar100", "CIFAR100"), ("flowers102", "Flowers102"), ("kmnist", "KMNIST")])
def test_prepare_uses_torchvision_and_fails_in_one_line(tmp_path, capsys, monkeypatch, name, cls):
    from tvtool.cli import main

    calls = []

    def offline(root, *a, download=False, **k):
        calls.append((root, download))
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, cls, offline)
    assert main(["data", "prepare", name, "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    layout = get_dataset(name).layout_help.split("; `tvtool data prepare")[0]
    assert err.count("\n") == 1 and "download failed" in err and layout in err
    assert "tvtool data prepare" not in err  # the manual steps never point back at the command that just failed
    assert calls == [(str(tmp_path), True)]


def test_prepare_fer2013_prints_manual_steps(tmp_path, capsys):
    from tvtool.cli import main

    assert main(["data", "prepare", "fer2013", "--data-root", str(tmp_path)]) == 1
    assert "kaggle.com" in capsys.readouterr().out
