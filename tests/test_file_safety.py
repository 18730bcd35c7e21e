"""Hostile inputs and interrupted or racing writers: one clear line, bounded time, nothing lost or left behind."""
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tvtool import fileio
from tvtool import taskvector as tv
from tvtool.cli import main
from tvtool.errors import TVToolError

ROOT = Path(__file__).resolve().parents[1]


def _meta(**over):
    meta = tv.new_meta({"model": None, "pretrained": "base.safetensors", "fingerprint": "fp1:" + "a" * 16},
                       tasks=["t"])
    meta.update(over)
    return meta


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def _one_line_error(capsys, argv, needle):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


@pytest.fixture
def vec(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"visual.w": torch.randn(24, 16, generator=g), "visual.b": torch.randn(16, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(ft, tmp_path / "ft.safetensors")
    tv.extract(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), tmp_path / "v.st", tasks=["t"])
    return tmp_path, tmp_path / "v.st"


# ------------------------------------------------------------------------------------------ racing writers
def test_two_writers_one_output_exactly_one_wins(tmp_path):
    out = tmp_path / "o.st"
    a = {"visual.w": torch.ones(4)}
    b = {"visual.w": torch.full((4,), 2.0)}
    # writer A has passed the existence check and is writing when writer B publishes the same output
    with pytest.raises(TVToolError, match="created by someone else"):
        with fileio.atomic_path(out) as tmp_a:
            tv.write_vector(out, b, _meta())
            save_file(a, tmp_a)
    assert load_file(out)["visual.w"].tolist() == [2.0] * 4  # B's result survives
    assert _temps(tmp_path) == []  # A's temp is gone
    # with force the later writer replaces, as before
    with fileio.atomic_path(out, force=True) as tmp_a:
        save_file(a, tmp_a)
    assert load_file(out)["visual.w"].tolist() == [1.0] * 4


# ------------------------------------------------------------------------------------------ --force targets
def test_force_replaces_regular_files_only(vec, capsys):
    tmp, v = vec
    os.mkfifo(tmp / "fifo")
    (tmp / "folder").mkdir()
    (tmp / "to_dev").symlink_to("/dev/null")
    (tmp / "to_fifo").symlink_to(tmp / "fifo")
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    for target, needle in [("fifo", "FIFO"), ("folder", "directory"), ("to_dev", "device"), ("to_fifo", "FIFO"),
                           ("dangling", "dangling")]:
        _one_line_error(capsys, ["negate", v, "-o", tmp / target, "--force"], needle)
    assert (tmp / "to_dev").is_symlink() and os.readlink(tmp / "to_dev") == "/dev/null"
    assert (tmp / "fifo").is_fifo() and (tmp / "to_fifo").is_symlink() and (tmp / "dangling").is_symlink()
    assert _temps(tmp) == []
    # a regular file (or a symlink to one) is replaced
    (tmp / "old.st").write_bytes(b"old")
    assert main(["negate", str(v), "-o", str(tmp / "old.st"), "--force"]) == 0
    assert set(load_file(tmp / "old.st")) == {"visual.w", "visual.b"}


# ------------------------------------------------------------------------------------------ signals
SLOW_WRITER = r"""
import sys, time, pathlib, torch
from tvtool import taskvector as tv
out, ready = sys.argv[1], sys.argv[2]
shapes = {"visual.a": (1 << 20,), "visual.b": (1 << 20,)}
def items():
    yield "visual.a", torch.ones(1 << 20)
    pathlib.Path(ready).touch()  # the temp file exists and holds data: now kill us
    for _ in range(1200):  # short sleeps: a signal taken by another thread (torch's) runs its handler at the next one
        time.sleep(0.1)
    yield "visual.b", torch.ones(1 << 20)
meta = tv.new_meta({"model": None, "pretrained": None, "fingerprint": None})
tv.write_vector(out, items(), meta, specs={k: (torch.float32, s) for k, s in shapes.items()})
"""


def _start_slow_writer(tmp_path):
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path / "o.st"), str(ready)], env=env,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(_temps(tmp_path)) == 1
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_sighup_remove_the_temp_and_end_by_the_signal(tmp_path, signum):
    proc = _start_slow_writer(tmp_path)
    proc.send_signal(signum)
    proc.wait(timeout=60)
    assert proc.returncode == -signum  # ended by the signal: the shell reports 128 + signum
    assert _temps(tmp_path) == [] and not (tmp_path / "o.st").exists()


def test_sigkill_temp_removed_by_next_write_to_that_output(tmp_path):
    proc = _start_slow_writer(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    (stale,) = _temps(tmp_path)
    assert str(proc.pid) in stale  # recognisable: the writer's pid is in the name
    # a live writer's temp of the same output, and a dead writer's temp of another output, are kept
    live = fileio._temp_name(tmp_path / "o.st")  # this (running) process's name for a temp of o.st
    live.write_bytes(b"busy")
    other = tmp_path / stale.replace(".o.st.", ".p.st.")
    other.write_bytes(b"")
    tv.write_vector(tmp_path / "o.st", {"visual.w": torch.ones(3)}, _meta())
    assert sorted(_temps(tmp_path)) == sorted([live.name, other.name])
    assert load_file(tmp_path / "o.st")["visual.w"].tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ write errors
def test_folder_outputs_publish_atomically_and_force_replaces_folders_and_files_only(tmp_path):
    """Folder outputs (transformers / open_clip folders) follow the file rules: refused if present without
    --force, replaced whole with it, never over a FIFO or device, and a failed write leaves nothing behind."""
    out = tmp_path / "model"

    def write(force=False, fail=False):
        with fileio.atomic_path(out, force, directory=True) as tmp:
            (tmp / "config.json").write_text("{}")
            if fail:
                raise RuntimeError("disk gone")

    write()
    assert sorted(p.name for p in out.iterdir() if p.name != fileio.FOLDER_MARKER) == ["config.json"]
    with pytest.raises(TVToolError, match="pass force=True to overwrite"):  # the Python API names its parameter
        write()
    assert (out / fileio.FOLDER_MARKER).is_file()  # what lets --force know tvtool wrote it
    (out / "stale.bin").write_text("old")
    write(force=True)  # replaced whole: nothing of the old folder survives
    assert sorted(p.name for p in out.iterdir() if p.name != fileio.FOLDER_MARKER) == ["config.json"]
    with pytest.raises(RuntimeError):
        write(force=True, fail=True)
    assert sorted(p.name for p in out.iterdir() if p.name != fileio.FOLDER_MARKER) == ["config.json"]  # the old output stays
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # and no temp folder is left
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TVToolError, match="replaces regular files and folders only"):
        with fileio.atomic_path(fifo, True, directory=True):
            pass
    assert fifo.exists() and not fifo.is_dir()


def test_disk_full_names_the_output(vec):
    tmp, v = vec
    big = tmp / "big.st"
    tv.write_vector(big, {"visual.w": torch.ones(1 << 16)}, _meta())

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past 4 KiB fail as on a full disk

    r = subprocess.run([sys.executable, "-m", "tvtool", "negate", str(big), "-o", str(tmp / "out.st")],
                       capture_output=True, text=True, preexec_fn=small_files,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(tmp / "out.st") in r.stderr and "cannot write" in r.stderr
    assert not (tmp / "out.st").exists() and _temps(tmp) == []


# ------------------------------------------------------------------------------------------ non-finite values
def test_fp16_overflow_refused_after_the_cast(vec, capsys):
    tmp, v = vec
    save_file({"visual.w": torch.full((4,), 1e6)}, tmp / "large.st", metadata={"tvtool": json.dumps(_meta())})
    _one_line_error(capsys, ["add", tmp / "large.st", "--dtype", "fp16", "-o", tmp / "h.st"], "after conversion to")
    assert not (tmp / "h.st").exists() and _temps(tmp) == []
    assert main(["add", str(tmp / "large.st"), "--dtype", "bf16", "-o", str(tmp / "b.st")]) == 0  # bf16 holds 1e6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vector_refused_by_every_reader(vec, capsys, bad):
    tmp, v = vec
    tensors = load_file(v)
    tensors["visual.w"][3, 2] = bad
    save_file(tensors, tmp / "bad.st", metadata={"tvtool": json.dumps(tv.open_vector(v).meta)})
    needle = "tensor visual.w holds NaN or inf"
    _one_line_error(capsys, ["inspect", tmp / "bad.st"], needle)
    _one_line_error(capsys, ["inspect", "--cosine", v, tmp / "bad.st"], needle)
    _one_line_error(capsys, ["add", v, tmp / "bad.st", "--alpha", "0", "-o", tmp / "o.st"], needle)
    _one_line_error(capsys, ["apply", tmp / "bad.st", "--base", tmp / "base.safetensors", "-o", tmp / "m.st"], needle)
    for method in ("ties", "tsv", "iso-c"):
        _one_line_error(capsys, ["merge", "-m", method, v, tmp / "bad.st", "-o", tmp / "o.st"], needle)
    assert not (tmp / "o.st").exists() and not (tmp / "m.st").exists() and _temps(tmp) == []


# ------------------------------------------------------------------------------------------ base check
def test_apply_refuses_a_vector_without_base_fingerprint(vec, capsys):
    tmp, v = vec
    meta = tv.open_vector(v).meta
    meta["base"] = {"model": None, "pretrained": None, "fingerprint": None}
    tv.write_vector(tmp / "nofp.st", load_file(v), meta)
    _one_line_error(capsys, ["apply", tmp / "nofp.st", "--base", tmp / "base.safetensors", "-o", tmp / "m.st"],
                    "--no-check-base")
    assert not (tmp / "m.st").exists()
    assert main(["apply", str(tmp / "nofp.st"), "--base", str(tmp / "base.safetensors"), "-o", str(tmp / "m.st"),
                 "--no-check-base"]) == 0
    torch.testing.assert_close(load_file(tmp / "m.st")["visual.w"], load_file(tmp / "ft.safetensors")["visual.w"])


# ------------------------------------------------------------------------------------------ metadata types
@pytest.mark.parametrize("doc,needle", [
    ([1, 2], "expected an object"),
    (7, "expected an object"),
    ("tvtool", "expected an object"),
    ({"format_version": "abc"}, "format_version"),
    ({"format_version": None}, "format_version"),
    ({"format_version": True}, "format_version"),
    ({"base": "ViT-B-32"}, "'base'"),
    ({"base": {"fingerprint": 12}}, "base.fingerprint"),
    ({"history": "extract"}, "'history'"),
    ({"history": ["extract"]}, "'history'"),
    ({"history": [{"op": "add", "inputs": "a.st"}]}, "'history'"),
    ({"history": [{"op": "add", "inputs": [{"history": "x"}]}]}, "'history'"),
    ({"tasks": "cars"}, "'tasks'"),
    ({"tasks": [1, 2]}, "'tasks'"),
    ({"mode": 3}, "'mode'"),
    ({"orthoreg": "on"}, "'orthoreg'"),
    ({"fingerprint": 5}, "'fingerprint'"),
])
def test_metadata_of_the_wrong_type_is_one_line(vec, capsys, doc, needle):
    tmp, v = vec
    meta = {**tv.open_vector(v).meta, **doc} if isinstance(doc, dict) else doc
    save_file(load_file(v), tmp / "m.st", metadata={"tvtool": json.dumps(meta)})
    _one_line_error(capsys, ["inspect", tmp / "m.st"], needle)
    _one_line_error(capsys, ["add", v, tmp / "m.st", "-o", tmp / "o.st"], needle)
    assert not (tmp / "o.st").exists()


def test_null_metadata_fields_are_valid(vec, capsys):
    tmp, v = vec
    meta = {**tv.open_vector(v).meta, "history": None, "tasks": None, "mode": None, "orthoreg": None}
    save_file(load_file(v), tmp / "m.st", metadata={"tvtool": json.dumps(meta)})
    assert main(["inspect", str(tmp / "m.st")]) == 0
    assert main(["add", str(v), str(tmp / "m.st"), "-o", str(tmp / "o.st")]) == 0


# ------------------------------------------------------------------------------------------ hostile headers
def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


META = {"__metadata__": {"tvtool": json.dumps(_meta())}}


@pytest.mark.parametrize("name,header,data,needle", [
    ("negative_dim", {**META, "visual.w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, 16,
     "non-negative"),
    ("float_dim", {**META, "visual.w": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}, 16,
     "non-negative"),
    ("overlap", {**META, "visual.a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "visual.b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, "overlaps"),
    ("gap", {**META, "visual.a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "gap"),
    ("trailing", {**META, "visual.a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "after the last"),
    ("size_mismatch", {**META, "visual.a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "need"),
    ("unknown_dtype", {**META, "visual.a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    ("meta_not_str", {"__metadata__": {"tvtool": 3}, "visual.a": {"dtype": "F32", "shape": [2],
                                                                  "data_offsets": [0, 8]}}, 8, "__metadata__"),
    ("not_utf8", b'{"\xff": 1}', 0, "not JSON"),
])
def test_invalid_headers_rejected_like_safetensors_does(tmp_path, capsys, name, header, data, needle):
    path = _raw_file(tmp_path / f"{name}.st", header, bytes(data))
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(TVToolError, match=needle):
        tv.open_vector(path)
    _one_line_error(capsys, ["inspect", path], needle)


def test_duplicate_keys_rejected(tmp_path):
    first = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    second = '{"dtype":"F32","shape":[2],"data_offsets":[8,16]}'
    raw = ('{"__metadata__":' + json.dumps(META["__metadata__"]) + ',"visual.a":' + first + ',"visual.a":' + second
           + "}").encode()
    path = tmp_path / "dup.st"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(TVToolError, match="appears twice"):
        tv.open_vector(path)


def test_valid_edge_cases_still_read(tmp_path):
    # zero-size tensors and an empty file body are valid safetensors: we read what the library reads
    save_file({"visual.e": torch.zeros(0, 4), "visual.a": torch.ones(2)}, tmp_path / "z.st",
              metadata={"tvtool": json.dumps(_meta())})
    v = tv.open_vector(tmp_path / "z.st")
    assert v.shape("visual.e") == (0, 4) and v.get("visual.a").tolist() == [1.0, 1.0]


def test_unreadable_file_is_one_line(vec, capsys, monkeypatch):
    tmp, v = vec
    real_open = os.open

    def deny(path, *a, **kw):  # as root chmod cannot deny a read, so the refusal is simulated
        if Path(path) == v:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    _one_line_error(capsys, ["inspect", v], "Permission denied")
    _one_line_error(capsys, ["apply", v, "--base", tmp / "base.safetensors", "-o", tmp / "m.st"], "Permission denied")


# ------------------------------------------------------------------------------------------ FIFOs and devices
def test_fifo_and_device_inputs_refused_at_once(vec):
    tmp, v = vec
    os.mkfifo(tmp / "pipe.st")
    os.mkfifo(tmp / "pipe.safetensors")
    p, base = str(tmp), str(tmp / "base.safetensors")
    cases = [["inspect", p + "/pipe.st"], ["add", str(v), p + "/pipe.st", "-o", p + "/o.st"],
             ["apply", str(v), "--base", p + "/pipe.safetensors", "-o", p + "/o.st"],
             ["extract", "--base", base, "--finetuned", p + "/pipe.safetensors", "-o", p + "/o.st"],
             ["inspect", "/dev/zero"], ["negate", "/dev/stdin", "-o", p + "/o.st"]]
    # one process for all cases (start-up is slow); a timeout, since before the fix a FIFO blocked forever
    script = f"import sys\nfrom tvtool.cli import main\nsys.exit(sum(main(c) != 1 for c in {cases!r}))\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = r.stderr.splitlines()
    assert r.returncode == 0, r.stderr
    assert len(lines) == 6 and all(line.startswith("error: ") for line in lines), r.stderr
    assert sum("is a FIFO" in line for line in lines) == 4 and sum("is a device" in line for line in lines) == 2
    assert not (tmp / "o.st").exists()


def test_write_errors_are_one_line_and_still_oserrors(tmp_path):
    import errno

    with pytest.raises(TVToolError, match=r"o\.st: cannot write the output \(no space left") as info:
        with fileio.atomic_path(tmp_path / "o.st"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(info.value, OSError)  # caches that tolerate unwritable folders (except OSError) still do
    assert _temps(tmp_path) == [] and not (tmp_path / "o.st").exists()
