"""Hostile dataset files (issue 19): no code runs from a data file, every bad file is one line (or one problem in
`tvtool data check`), nothing blocks on a FIFO, nothing inflates or allocates past what the file really holds, and
`data check` validates what training would consume."""
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line, run_tvtool_patient as tvtool
from tvtool.datasets import get_dataset, load_split
from tvtool.errors import TVToolError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TVTOOL_DATA", raising=False)


def solid(path, label, k=0, size=(6, 5), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, ((37 * label + 11 * k) % 256, (91 * label) % 256, 5)).save(path, format=fmt)


def eurosat_tree(root, per_class=2, splits=("train", "val", "test")):
    for s in splits:
        for c in range(10):
            for k in range(per_class):
                solid(root / "EuroSAT_splits" / s / f"class_{c}" / f"img{k}.png", c, k)


def check_json(root, *names, timeout=300):
    """`tvtool data check NAMES --json` in a subprocess, as a user runs it: {name: result}; never a traceback."""
    r = tvtool("data", "check", *names, "--data-root", root, "--json", timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return {d["name"]: d for d in json.loads(r.stdout)["datasets"]}, r


def check_here(capsys, root, *names):
    """The same command in this process (the many variants of one class of bad file; one of each class also goes
    through the installed entry point with `check_json`)."""
    from tvtool.cli import main

    capsys.readouterr()
    rc = main(["data", "check", *names, "--data-root", str(root), "--json"])
    out = capsys.readouterr().out
    return {d["name"]: d for d in json.loads(out)["datasets"]}, rc


def one_problem(result, *needles):
    text = " | ".join(result["problems"])
    assert not result["present"], result
    for n in needles:
        assert n in text, text
    assert "\n" not in text and "Traceback" not in text
    return text


# ---- code from data: CIFAR pickles --------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs os.mkdir(marker): what a crafted CIFAR batch can do to plain pickle.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def cifar10_tree(root, payload_in="data_batch_3", obj=None, protocol=2):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        if name == payload_in:
            entry = obj
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=protocol)
    return base


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_read_by_the_restricted_reader_at_every_protocol(tmp_path, protocol):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    cifar10_tree(tmp_path, "test_batch", {"data": data, "labels": [9, 0, 4, 2], "batch_label": "testing batch 1 of 1",
                                          "filenames": ["a.png", "b.png", "c.png", "d.png"]}, protocol)
    x, y = load_split("cifar10", "test", tmp_path, image_size=32)
    assert y.tolist() == [9, 0, 4, 2]
    assert x.equal(torch.from_numpy(data.reshape(4, 3, 32, 32)))  # 32 -> 32: no resize, channel-major kept


def test_cifar_payload_never_runs(tmp_path):
    """`data check`, `finetune` and `eval` all list the split first: the payload is refused there, in one line."""
    marker = tmp_path / "pwned"
    root = tmp_path / "root"
    cifar10_tree(root, "data_batch_3", {"data": np.zeros((1, 3072), np.uint8), "labels": [_Payload(marker)]})
    results, r = check_json(root, "cifar10")
    one_problem(results["cifar10"], "data_batch_3", "mkdir", "refused")
    assert not marker.exists()
    r = tvtool("finetune", "cifar10", "--model", "tvtool-mini", "--no-eval", "--data-root", root,
                   "-o", tmp_path / "v.st")
    assert_one_line(r, "data_batch_3", "refus")
    assert not marker.exists() and not (tmp_path / "v.st").exists()


@pytest.mark.parametrize("obj", [
    {"data": np.zeros((1, 3072), np.uint8), "labels": [1], "extra": __import__("collections").OrderedDict()},
    {"data": np.zeros((1, 3072), dtype=object), "labels": [1]},  # object arrays pickle arbitrary objects
    {"data": np.zeros((1, 3072), np.uint8), "labels": [np.float64(1.5)]},
])
def test_cifar_anything_but_plain_arrays_and_lists_is_refused(tmp_path, obj):
    cifar10_tree(tmp_path, "test_batch", obj)
    with pytest.raises(TVToolError, match="test_batch"):
        get_dataset("cifar10").listing("test", tmp_path)


def test_cifar_labels_that_are_not_integers_or_do_not_match_the_images(tmp_path):
    for entry, needle in (({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "1 labels for 2 images"),
                          ({"data": np.zeros((2, 3072), np.uint8), "labels": [[1] * 1000] * 2}, "not whole numbers"),
                          ({"data": np.zeros((2, 3071), np.uint8), "labels": [1, 2]}, "3072"),
                          ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 10]}, "outside 0..9")):
        cifar10_tree(tmp_path, "test_batch", entry)
        with pytest.raises(TVToolError, match=needle):
            get_dataset("cifar10").listing("test", tmp_path)


# ---- code from data: Pillow plugins that run programs --------------------------------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def test_eps_named_jpg_never_reaches_ghostscript(tmp_path, monkeypatch, caplog):
    marker = tmp_path / "gs-ran"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gs = fake_bin / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    eurosat_tree(tmp_path, per_class=11, splits=("test",))
    (tmp_path / "EuroSAT_splits" / "test" / "class_3" / "img5.png").write_bytes(EPS)
    with caplog.at_level("WARNING", logger="tvtool.datasets"):
        _, y = load_split("eurosat", "test", tmp_path, image_size=4)
    assert not marker.exists()
    assert len(y) == 109 and "img5.png" in caplog.text  # skipped and counted as unreadable


def test_images_open_only_in_the_dataset_formats(tmp_path):
    from tvtool.datasets.files import IMAGE_FORMATS, open_image

    assert "EPS" not in IMAGE_FORMATS and {"JPEG", "PNG", "PPM", "TIFF", "BMP", "WEBP"} <= set(IMAGE_FORMATS)
    for fmt in ("JPEG", "PNG", "PPM", "TIFF", "BMP", "WEBP"):
        p = tmp_path / f"x.{fmt.lower()}"
        Image.new("RGB", (5, 4), (200, 10, 10)).save(p, format=fmt)
        img = open_image(p)
        assert img.size == (5, 4) and img.convert("RGB").getpixel((2, 2))[0] > 150
    eps = tmp_path / "y.jpg"
    eps.write_bytes(EPS)
    with pytest.raises(Exception) as e:
        open_image(eps)
    assert "y.jpg" in str(e.value)


def _png_header_only(path, width, height):
    """A valid PNG of width x height 1-bit pixels, all zero: tiny on disk, huge once decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_decompression_bomb_png_is_refused_before_decoding(tmp_path, caplog):
    eurosat_tree(tmp_path, per_class=11, splits=("test",))
    _png_header_only(tmp_path / "EuroSAT_splits" / "test" / "class_2" / "img0.png", 13000, 13000)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level("WARNING", logger="tvtool.datasets"):
        warnings.simplefilter("always")
        _, y = load_split("eurosat", "test", tmp_path, image_size=4)
    assert len(y) == 109 and "class_2/img0.png" in caplog.text
    assert not [w for w in seen if "DecompressionBomb" in type(w.message).__name__], [str(w.message) for w in seen]


# ---- symlinks and special files inside dataset folders -------------------------------------------------------------

@pytest.mark.parametrize("target", [".", "..", "../class_1"])
def test_folder_links_inside_a_class_folder_are_never_followed(tmp_path, target):
    eurosat_tree(tmp_path, per_class=2, splits=("test",))
    link = tmp_path / "EuroSAT_splits" / "test" / "class_0" / "loop"
    link.symlink_to(target)
    with pytest.raises(TVToolError) as e:
        get_dataset("eurosat").listing("test", tmp_path)
    assert "class_0/loop" in str(e.value) and "link" in str(e.value)


def test_file_link_back_into_the_tree_is_a_duplicate_and_a_link_out_is_read(tmp_path):
    eurosat_tree(tmp_path, per_class=2, splits=("test",))
    outside = tmp_path / "elsewhere" / "x.png"
    solid(outside, 0, 7)
    (tmp_path / "EuroSAT_splits" / "test" / "class_0" / "ext.png").symlink_to(outside)
    assert len(get_dataset("eurosat").listing("test", tmp_path)) == 21
    (tmp_path / "EuroSAT_splits" / "test" / "class_0" / "dup.png").symlink_to("../class_1/img0.png")
    with pytest.raises(TVToolError, match="dup.png.*inside the dataset"):
        get_dataset("eurosat").listing("test", tmp_path)


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path):
    eurosat_tree(tmp_path, per_class=2, splits=("test",))
    (tmp_path / "EuroSAT_splits" / "test" / "class_9b").symlink_to("class_9")
    with pytest.raises(TVToolError, match="class_9b"):
        get_dataset("eurosat").listing("test", tmp_path)


def test_fifos_in_dataset_folders_and_as_split_files_never_block(tmp_path):
    """One `data check` over every layout with a FIFO where a file belongs: each reported, none waited on."""
    root = tmp_path
    eurosat_tree(root, per_class=1)
    os.mkfifo(root / "EuroSAT_splits" / "train" / "class_4" / "img9.png")
    (root / "resisc45" / "NWPU-RESISC45" / "a").mkdir(parents=True)
    os.mkfifo(root / "resisc45" / "resisc45-train.txt")
    (root / "cifar-10-batches-py").mkdir()
    os.mkfifo(root / "cifar-10-batches-py" / "test_batch")
    (root / "stl10_binary").mkdir()
    (root / "stl10_binary" / "test_X.bin").write_bytes(b"")
    os.mkfifo(root / "stl10_binary" / "test_y.bin")
    (root / "gtsrb" / "GTSRB" / "Final_Test" / "Images").mkdir(parents=True)
    os.mkfifo(root / "gtsrb" / "GT-final_test.csv")
    (root / "MNIST" / "raw").mkdir(parents=True)
    os.mkfifo(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1])))
    (root / "fer2013").mkdir()
    os.mkfifo(root / "fer2013" / "fer2013.csv")
    (root / "food-101" / "meta").mkdir(parents=True)
    os.mkfifo(root / "food-101" / "meta" / "test.json")
    (root / "oxford-iiit-pet" / "annotations").mkdir(parents=True)
    (root / "oxford-iiit-pet" / "images").mkdir()
    os.mkfifo(root / "oxford-iiit-pet" / "annotations" / "test.txt")
    names = ["eurosat", "resisc45", "cifar10", "stl10", "gtsrb", "mnist", "fer2013", "food101", "oxfordiiitpet"]
    try:
        results, _ = check_json(root, *names)
    except subprocess.TimeoutExpired:
        pytest.fail("data check blocked on a FIFO")
    for name in names:
        one_problem(results[name], "FIFO")


def test_a_fifo_image_listed_by_a_split_file_is_skipped_not_waited_on(tmp_path, caplog):
    base = tmp_path / "oxford-iiit-pet"
    lines = []
    for i in range(120):
        solid(base / "images" / f"p{i}.jpg", i % 37, fmt="JPEG")
        lines.append(f"p{i} {i % 37 + 1} 1 1")
    (base / "annotations").mkdir()
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    (base / "images" / "p7.jpg").unlink()
    os.mkfifo(base / "images" / "p7.jpg")
    with caplog.at_level("WARNING", logger="tvtool.datasets"):
        _, y = load_split("oxfordiiitpet", "test", tmp_path, image_size=4)
    assert len(y) == 119 and "p7.jpg" in caplog.text


# ---- IDX files: bombs, malformed headers, labels training would choke on ------------------------------------------

def idx_bytes(array, code=0x08):
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    return (struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
            + np.asarray(array).astype(dtype).tobytes())


def mnist_tree(root, images=None, labels=None, split="t10k", gz=False):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else idx_bytes(np.zeros((3, 28, 28), np.uint8))
    labels = labels if labels is not None else idx_bytes(np.array([1, 2, 3]))
    for stem, data in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        (raw / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("header,needle", [
    (struct.pack(">BBBB", 0, 0, 0x08, 255), "dimensions"),                            # ndim 255, no dims follow
    (struct.pack(">BBBBiii", 0, 0, 0x08, 3, -5, 28, 28), "negative"),
    (struct.pack(">BBBBiiii", 0, 0, 0x08, 4, 2**31 - 1, 2**31 - 1, 2**31 - 1, 2**31 - 1), "declares"),
    (struct.pack(">BBBBiii", 0, 0, 0x08, 3, 3, 28, 28) + b"\x00" * 100, "truncated"),
    (struct.pack(">BBBBiii", 0, 0, 0x08, 3, 1, 2, 2) + b"\x00" * 100, "more data"),
])
def test_malformed_idx_headers_are_one_line(tmp_path, header, needle):
    mnist_tree(tmp_path, images=header)
    with pytest.raises(TVToolError, match=needle):
        get_dataset("mnist").listing("test", tmp_path)


def test_gzip_idx_bomb_is_not_inflated(tmp_path):
    """A 1 MB .gz whose header declares 3 images but inflates to 512 MB: read no more than it declares."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    body = [comp.compress(struct.pack(">BBBBiii", 0, 0, 0x08, 3, 3, 28, 28))]
    zeros = bytes(1 << 24)
    body += [comp.compress(zeros) for _ in range(32)]
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"".join(body) + comp.flush())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2, 3])))
    tracemalloc.start()
    try:
        with pytest.raises(TVToolError, match="more data"):
            get_dataset("mnist").listing("test", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_gzip_idx_declaring_more_than_it_can_hold_is_refused_before_allocating(tmp_path):
    mnist_tree(tmp_path, images=struct.pack(">BBBBiii", 0, 0, 0x08, 3, 10**8, 28, 28) + bytes(1000), gz=True)
    tracemalloc.start()
    try:
        with pytest.raises(TVToolError, match="declares"):
            get_dataset("mnist").listing("test", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


@pytest.mark.parametrize("labels,needle", [
    (idx_bytes(np.array([1.0, 2.5, 3.0]), 0x0D), "whole numbers"),
    (idx_bytes(np.array([1, -1, 3]), 0x09), "outside 0..9"),
    (idx_bytes(np.array([1, 12, 3])), "outside 0..9"),
    (idx_bytes(np.array([1, 2, 3, 4])), "4 labels for 3 images"),
])
def test_data_check_refuses_idx_labels_training_cannot_use(tmp_path, capsys, labels, needle):
    mnist_tree(tmp_path, split="train", images=idx_bytes(np.zeros((3, 28, 28), np.uint8)), labels=labels)
    mnist_tree(tmp_path, split="t10k")
    results, rc = check_here(capsys, tmp_path, "mnist")
    assert rc == 1
    one_problem(results["mnist"], "train-labels-idx1-ubyte", needle)


def test_data_check_of_idx_labels_through_the_installed_command(tmp_path):
    mnist_tree(tmp_path, split="train", images=idx_bytes(np.zeros((3, 28, 28), np.uint8)),
               labels=idx_bytes(np.array([1, 12, 3])))
    mnist_tree(tmp_path, split="t10k")
    results, r = check_json(tmp_path, "mnist")
    assert r.returncode == 1
    one_problem(results["mnist"], "train-labels-idx1-ubyte", "outside 0..9")


def test_idx_images_must_be_uint8(tmp_path):
    mnist_tree(tmp_path, images=idx_bytes(np.zeros((3, 28, 28)), 0x0D))
    with pytest.raises(TVToolError, match="uint8"):
        get_dataset("mnist").listing("test", tmp_path)


# ---- PCAM h5 -------------------------------------------------------------------------------------------------------

def pcam_tree(root, split="test", x=None, y=None, make=None):
    h5py = pytest.importorskip("h5py")
    base = root / "pcam"
    base.mkdir(exist_ok=True)
    stem = base / f"camelyonpatch_level_2_split_{split}"
    with h5py.File(f"{stem}_x.h5", "w") as f:
        if make and "x" in make:
            make["x"](f)
        else:
            f["x"] = x if x is not None else np.zeros((4, 96, 96, 3), np.uint8)
    with h5py.File(f"{stem}_y.h5", "w") as f:
        if make and "y" in make:
            make["y"](f)
        else:
            f["y"] = y if y is not None else np.array([0, 1, 1, 0], np.uint8).reshape(4, 1, 1, 1)


def test_pcam_declaring_billions_of_labels_is_refused_before_reading(tmp_path):
    pcam_tree(tmp_path, make={"y": lambda f: f.create_dataset("y", shape=(4_000_000_000, 1, 1, 1), dtype="u1",
                                                              chunks=(1 << 20, 1, 1, 1))})
    tracemalloc.start()
    try:
        with pytest.raises(TVToolError, match="y.h5"):
            get_dataset("pcam").listing("test", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


@pytest.mark.parametrize("make,needle", [
    ({"y": lambda f: f.create_group("y")}, "not an array"),
    ({"y": lambda f: f.create_dataset("y", data=np.array([b"a", b"b", b"c", b"d"]))}, "whole numbers"),
    ({"y": lambda f: f.create_dataset("y", data=np.array([0.5, 1, 0, 1]))}, "whole numbers"),
    ({"x": lambda f: f.create_group("x")}, "not an array"),
    ({"x": lambda f: f.create_dataset("x", data=np.zeros((4, 64, 64, 3), np.uint8))}, "96x96"),
    ({"x": lambda f: f.create_dataset("x", data=np.zeros((4, 96, 96, 3), np.float32))}, "uint8"),
    ({"y": lambda f: f.create_dataset("y", data=np.array([0, 1, 2, 0]))}, "outside 0..1"),
    ({"y": lambda f: f.create_dataset("y", data=np.array([0, 1, 1, 0, 1]))}, "5 labels for 4 images"),
])
def test_pcam_wrong_contents_are_one_problem_each(tmp_path, capsys, make, needle):
    pcam_tree(tmp_path, "train", make=make)
    pcam_tree(tmp_path, "valid")
    pcam_tree(tmp_path, "test")
    results, rc = check_here(capsys, tmp_path, "pcam")
    assert rc == 1
    one_problem(results["pcam"], needle)


def test_pcam_wrong_height_and_width_through_the_installed_command(tmp_path):
    pcam_tree(tmp_path, "train", x=np.zeros((4, 64, 64, 3), np.uint8))
    pcam_tree(tmp_path, "valid")
    pcam_tree(tmp_path, "test")
    results, r = check_json(tmp_path, "pcam")
    assert r.returncode == 1
    one_problem(results["pcam"], "camelyonpatch_level_2_split_train_x.h5", "96x96")


# ---- CSV and text files -------------------------------------------------------------------------------------------

FER_HEAD = "emotion,pixels,Usage\n"


def fer_row(label, usage="PublicTest", n=48 * 48):
    return f"{label}," + " ".join(["7"] * n) + f",{usage}\n"


@pytest.mark.parametrize("body,needle", [
    (fer_row(1) + "2," + "1 " * 200_000 + ",PublicTest\n", "fer2013.csv:3"),    # one field of 400 KB
    ((fer_row(1) + "3,\xff\xfe,PublicTest\n").encode("latin-1"), "UTF-8"),
    (fer_row(1) + fer_row(2, n=100), "2304"),
    (fer_row(1) + "9," + " ".join(["7"] * 2304) + ",PublicTest\n", "0..6"),
])
def test_fer2013_bad_rows_are_one_line(tmp_path, body, needle):
    (tmp_path / "fer2013").mkdir()
    path = tmp_path / "fer2013" / "fer2013.csv"
    if isinstance(body, bytes):
        path.write_bytes(FER_HEAD.encode() + body)
    else:
        path.write_text(FER_HEAD + body)
    with pytest.raises(TVToolError, match=needle):
        get_dataset("fer2013").listing("test", tmp_path)


def gtsrb_test_tree(root, csv_text):
    imgs = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    for i in range(2):
        solid(imgs / f"{i:05d}.ppm", i, fmt="PPM")
    (root / "gtsrb" / "GT-final_test.csv").write_text(csv_text)


@pytest.mark.parametrize("csv_text,needle", [
    ("Filename;Width\n00000.ppm;8\n", "ClassId"),
    ("Filename;ClassId\n00000.ppm;stop sign\n", "stop sign"),
    ("Filename;ClassId\n00000.ppm;43\n", "outside 0..42"),
    ("Filename;ClassId\n../../../etc/passwd;3\n", "passwd"),
    ("Filename;ClassId\n0000\x000.ppm;3\n", "NUL"),
])
def test_gtsrb_bad_csv_is_one_line(tmp_path, csv_text, needle):
    gtsrb_test_tree(tmp_path, csv_text)
    with pytest.raises(TVToolError, match=needle):
        get_dataset("gtsrb").listing("test", tmp_path)


def test_non_utf8_split_lists_are_one_line(tmp_path):
    (tmp_path / "resisc45" / "NWPU-RESISC45" / "a").mkdir(parents=True)
    (tmp_path / "resisc45" / "resisc45-test.txt").write_bytes(b"a_1.jpg\n\xff\xfe.jpg\n")
    (tmp_path / "oxford-iiit-pet" / "annotations").mkdir(parents=True)
    (tmp_path / "oxford-iiit-pet" / "images").mkdir()
    (tmp_path / "oxford-iiit-pet" / "annotations" / "test.txt").write_bytes(b"Abyssinian_1 1 1 1\n\xe9 2 1 1\n")
    results, _ = check_json(tmp_path, "resisc45", "oxfordiiitpet")
    one_problem(results["resisc45"], "resisc45-test.txt:2", "UTF-8")
    one_problem(results["oxfordiiitpet"], "test.txt:2", "UTF-8")


def test_nul_in_listed_names_is_one_line(tmp_path):
    (tmp_path / "oxford-iiit-pet" / "annotations").mkdir(parents=True)
    (tmp_path / "oxford-iiit-pet" / "images").mkdir()
    (tmp_path / "oxford-iiit-pet" / "annotations" / "test.txt").write_text("Abys\x00sinian_1 1 1 1\n")
    with pytest.raises(TVToolError, match="NUL"):
        get_dataset("oxfordiiitpet").listing("test", tmp_path)
    (tmp_path / "food-101" / "meta").mkdir(parents=True)
    (tmp_path / "food-101" / "meta" / "test.json").write_text(json.dumps({"apple_pie": ["apple_pie/1\x002"]}))
    with pytest.raises(TVToolError, match="NUL"):
        get_dataset("food101").listing("test", tmp_path)


@pytest.mark.parametrize("doc,needle", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    (json.dumps({"apple_pie": "apple_pie/1"}), "list"),
    (json.dumps(["apple_pie/1"]), "mapping"),
    (json.dumps({"apple_pie": ["../../../../etc/passwd"]}), "passwd"),
])
def test_food101_metadata_of_the_wrong_shape_is_one_line(tmp_path, doc, needle):
    (tmp_path / "food-101" / "meta").mkdir(parents=True)
    (tmp_path / "food-101" / "meta" / "test.json").write_text(doc)
    with pytest.raises(TVToolError, match=needle):
        get_dataset("food101").listing("test", tmp_path)


# ---- SVHN .mat ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x,y,needle", [
    (np.zeros((32, 32, 3), np.uint8), np.ones((1, 1)), "32x32x3xN"),                       # rank 3
    (np.zeros((32, 32, 3, 2), np.uint8), np.ones((3, 1)), "3 labels for 2 images"),
    (np.zeros((32, 32, 3, 2), np.uint8), np.array([[1.5], [2]]), "whole numbers"),
    (np.zeros((32, 32, 3, 2), np.uint8), np.array([[11], [2]]), "outside 0..10"),
    (np.zeros((32, 32, 3, 2), np.float64), np.array([[1], [2]]), "uint8"),
    (np.zeros((16, 16, 3, 2), np.uint8), np.array([[1], [2]]), "32x32x3xN"),
])
def test_svhn_mat_of_the_wrong_shape_is_one_problem(tmp_path, capsys, x, y, needle):
    svhn_tree(tmp_path, x, y)
    results, rc = check_here(capsys, tmp_path, "svhn")
    assert rc == 1
    one_problem(results["svhn"], "train_32x32.mat", needle)


def svhn_tree(root, x, y):
    import scipy.io

    (root / "svhn").mkdir()
    scipy.io.savemat(root / "svhn" / "train_32x32.mat", {"X": x, "y": y})
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                        "y": np.array([[1], [2]])})


def test_svhn_with_more_labels_than_images_through_the_installed_command(tmp_path):
    svhn_tree(tmp_path, np.zeros((32, 32, 3, 2), np.uint8), np.ones((3, 1)))
    results, r = check_json(tmp_path, "svhn")
    assert r.returncode == 1
    one_problem(results["svhn"], "train_32x32.mat", "3 labels for 2 images")


def test_svhn_mat_that_is_not_a_mat_file_is_one_problem(tmp_path):
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0" + bytes(200))
    with pytest.raises(TVToolError, match="test_32x32.mat"):
        get_dataset("svhn").listing("test", tmp_path)


def test_mat_file_inflating_past_the_bound_is_refused_before_scipy_reads_it(tmp_path, monkeypatch):
    """A compressed .mat variable is a decompression bomb like a .gz: counted while streaming, refused past the
    bound (lowered here: 12 MB of zeros against 4 MB) without scipy ever allocating it."""
    import scipy.io

    from tvtool.datasets import files

    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 4000), np.uint8),
                                                            "y": np.ones((4000, 1))}, do_compression=True)
    assert (tmp_path / "svhn" / "test_32x32.mat").stat().st_size < 1 << 20
    monkeypatch.setattr(files, "MAX_MAT_INFLATED", 4 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(TVToolError, match="inflate to more than"):
            get_dataset("svhn").listing("test", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    monkeypatch.setattr(files, "MAX_MAT_INFLATED", 64 << 20)
    assert len(get_dataset("svhn").listing("test", tmp_path)) == 4000  # within the bound: read as before


# ---- writing the dataset and heads caches when the disk is full ------------------------------------------------

@pytest.mark.parametrize("limit,written", [(2_000, "heads/eurosat-"), (64_000, "datasets/eurosat/train-32.safetensors")])
def test_disk_full_while_writing_a_cache_is_one_line_and_leaves_nothing(tmp_path, limit, written):
    """`finetune` builds the zero-shot head, then decodes the split, caching both: a full disk (here a file size
    limit: 2 KB fails the head, 64 KB the images) is one line naming the cache file, and no temp is left."""
    import resource

    from cli_helpers import REPO, entry_point

    eurosat_tree(tmp_path / "root", per_class=10)
    cache = tmp_path / "cache"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past the limit fail as on a full disk

    r = subprocess.run([entry_point(), "finetune", "eurosat", "--model", "tvtool-mini", "--no-eval", "--max-steps",
                        "1", "--device", "cpu", "--data-root", str(tmp_path / "root"), "-o", str(tmp_path / "v.st")],
                       capture_output=True, text=True, preexec_fn=small_files, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "TVTOOL_CACHE": str(cache)})
    assert_one_line(r, str(cache / written), "cannot write")
    temps = [p for p in cache.rglob("*") if p.is_file() and ".tvtmp-" in p.name]
    assert temps == [] and not (tmp_path / "v.st").exists()
