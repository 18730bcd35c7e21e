"""Hostile checkpoint and config files (issue 19, the checkpoint half): every one is refused with one line (a
TVToolError, no traceback), in bounded time and memory, before anything large is allocated, and no code runs.

The files here are crafted by hand (pickle opcodes, zip members, JSON text) to claim what no real checkpoint does:
storages of 10^12 elements in a few bytes, stride-0 views, zip bombs, "billion laughs" pickles, nesting past any
model, tensors whose shapes disagree with their architecture. Commands run through the installed `tvtool`
(cli_helpers.run_tvtool), some under an address-space limit so that an allocation of gigabytes fails loudly
instead of quietly succeeding on a large machine."""
import collections
import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from cli_helpers import REPO, entry_point, run_python, run_tvtool
from tvtool.checkpoints import open_weights
from tvtool.errors import TVToolError

MEM_LIMIT = 6 << 30  # address space of a limited `tvtool` run: torch and open_clip import within 4 GiB


def tvtool_limited(*args, timeout=240):
    """`tvtool ARGS` with its address space capped: declared gigabytes must be refused, not allocated."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "COLUMNS": "120", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))

    return subprocess.run([entry_point(), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, preexec_fn=cap)


def one_line(r, *words):
    """Refused: exit 1, one line on stderr (no traceback), naming ``words``."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert len(r.stderr) < 600, r.stderr[:600]
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


def extract(path, tmp_path):
    out = tmp_path / "tv.safetensors"
    r = tvtool_limited("extract", "--base", path, "--finetuned", path, "-o", out)
    assert not out.exists()
    return r


# ------------------------------------------------------------------------------------------- crafted pickles
class _Ref:
    """Pickled as the persistent id ``pid`` (how torch.save names a storage)."""

    def __init__(self, pid):
        self.pid = pid


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _pickle(obj, protocol=2) -> bytes:
    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, o):
            return o.pid if isinstance(o, _Ref) else None

    P(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def tensor(key, numel, size, stride, offset=0, legacy=False):
    """torch._utils._rebuild_tensor_v2 of a float32 storage ``key`` declared to hold ``numel`` elements."""
    pid = ("storage", torch.FloatStorage, key, "cpu", numel) + ((None,) if legacy else ())
    return _Call(torch._utils._rebuild_tensor_v2, _Ref(pid), offset, tuple(size), tuple(stride), False,
                 collections.OrderedDict())


def torch_zip(path, obj=None, storages=None, *, data_pkl=None, compress=False):
    """A torch.save zip archive holding ``obj`` (or the raw ``data_pkl``) and raw storage records."""
    kind = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl if data_pkl is not None else _pickle(obj))
        zf.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw, compress_type=kind)
        zf.writestr("archive/version", "3\n")
    return path


def legacy_file(path, obj, storages: dict):
    """torch's pre-1.6 format: magic, protocol, sys info, the pickle, the storage keys, then each storage as
    (numel, bytes)."""
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2), _pickle(obj),
             pickle.dumps(list(storages), protocol=2)]
    for raw in storages.values():
        parts.append(struct.pack("<q", len(raw) // 4) + raw)
    path.write_bytes(b"".join(parts))
    return path


FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


def test_a_well_formed_crafted_checkpoint_is_read(tmp_path):
    """The crafting helpers make files the reader accepts when they tell the truth (so each refusal below is
    about the lie, not the crafting)."""
    z = torch_zip(tmp_path / "ok.pt", {"visual.w": tensor("0", 4, (2, 2), (2, 1))}, {"0": FOUR_FLOATS})
    assert torch.equal(open_weights(z).get("visual.w"), torch.arange(4.0).view(2, 2))
    t = torch.arange(4.0).view(2, 2).t()  # a transposed view, as torch.save writes it
    assert torch.equal(open_weights(torch_zip(tmp_path / "t.pt", {"visual.w": tensor("0", 4, (2, 2), (1, 2))},
                                              {"0": FOUR_FLOATS})).get("visual.w"), t)
    leg = legacy_file(tmp_path / "ok_legacy.pt", {"visual.w": tensor("0", 4, (4,), (1,), legacy=True)},
                      {"0": FOUR_FLOATS})
    assert torch.equal(open_weights(leg).get("visual.w"), torch.arange(4.0))


@pytest.mark.parametrize("case, words", [
    ("storage of 10^12 elements in a 16-byte record", ["declares", "storage 0"]),
    ("stride-0 view of 4 stored values", ["repeats its stored elements"]),
    ("view reaching past its storage", ["reaches element"]),
    ("one storage under many names", ["same stored values under many names"]),
    ("negative stride", ["not a non-negative integer"]),
])
def test_zip_storages_that_lie_about_their_size_are_refused(tmp_path, case, words):
    storages = {"0": FOUR_FLOATS}
    obj = {
        "storage of 10^12 elements in a 16-byte record": {"visual.w": tensor("0", 10 ** 12, (4,), (1,))},
        "stride-0 view of 4 stored values": {"visual.w": tensor("0", 4, (2000, 2000), (0, 0))},
        "view reaching past its storage": {"visual.w": tensor("0", 4, (100,), (1,))},
        "one storage under many names": {f"visual.w{i}": tensor("0", 1 << 18, (1 << 18,), (1,)) for i in range(8)},
        "negative stride": {"visual.w": tensor("0", 4, (4,), (-1,), offset=3)},
    }[case]
    if case == "one storage under many names":
        storages = {"0": bytes(1 << 20)}
    path = torch_zip(tmp_path / "evil.pt", obj, storages)
    with pytest.raises(TVToolError) as err:
        open_weights(path)
    for w in words:
        assert w in str(err.value)
    if case.startswith("stride-0"):
        one_line(extract(path, tmp_path), "repeats its stored elements")


def test_legacy_storage_larger_than_the_file_is_refused_before_allocating(tmp_path):
    """The legacy format allocates storages while unpickling and fills them after: 10^9 declared floats (4 GB) in
    a file of a few hundred bytes are refused before any allocation (the limited run would fail to allocate)."""
    path = legacy_file(tmp_path / "evil_legacy.pt", {"visual.w": tensor("0", 10 ** 9, (4,), (1,), legacy=True)},
                       {"0": FOUR_FLOATS})
    one_line(extract(path, tmp_path), "declare", "file holds only")


def test_legacy_view_past_its_storage_is_refused(tmp_path):
    pid = ("storage", torch.FloatStorage, "0", "cpu", 4, ("view0", 2, 10 ** 6))
    obj = {"visual.w": _Call(torch._utils._rebuild_tensor_v2, _Ref(pid), 0, (4,), (1,), False,
                             collections.OrderedDict())}
    path = legacy_file(tmp_path / "view.pt", obj, {"0": FOUR_FLOATS})
    with pytest.raises(TVToolError, match="a view of 1000000 elements"):
        open_weights(path)


def test_zip_bomb_storage_is_refused_before_inflating(tmp_path):
    """torch.save stores its members uncompressed; a deflated member that inflates ~1000-fold (64 MiB of zeros
    from 64 KiB) is a decompression bomb, refused from its header."""
    n = 16 << 20
    path = torch_zip(tmp_path / "bomb.pt", {"visual.w": tensor("0", n, (n,), (1,))}, {"0": bytes(4 * n)},
                     compress=True)
    assert path.stat().st_size < 1 << 20
    one_line(extract(path, tmp_path), "inflate")


def test_data_pkl_member_that_claims_more_than_the_zip_holds(tmp_path):
    path = torch_zip(tmp_path / "lie.pt", {"visual.w": tensor("0", 4, (4,), (1,))}, {"0": FOUR_FLOATS})
    raw = bytearray(path.read_bytes())
    # the central directory's uncompressed size of data.pkl (offset 24 of its entry) claims 2 GB
    cd = raw.rfind(b"PK\x01\x02", 0, raw.find(b"archive/data.pkl", raw.find(b"PK\x01\x02")) + 1)
    raw[cd + 24:cd + 28] = struct.pack("<I", 2 << 30)
    path.write_bytes(bytes(raw))
    with pytest.raises(TVToolError, match="data.pkl"):
        open_weights(path)


# --------------------------------------------------------------------------- billion laughs and deep nesting
def _laughs(levels=9, fan=10):
    """Lists of ``fan`` references to the list below, ``levels`` deep: a few hundred pickled bytes that print as
    fan**levels items."""
    x = ["lol" * 10]
    for _ in range(levels):
        x = [x] * fan
    return x


def _laugh_key_pickle(levels=12, fan=10) -> bytes:
    """{T: 1} where T is a tuple of ``fan`` references to the tuple below, ``levels`` deep (fan**levels items),
    written opcode by opcode: building it in this process would hash T."""
    out = b"\x80\x02}" + b"X\x03\x00\x00\x00lol\x85q\x000"
    for level in range(1, levels + 1):
        out += b"(" + (b"h" + bytes([level - 1])) * fan + b"tq" + bytes([level]) + b"0"
    return out + b"h" + bytes([levels]) + b"K\x01s."


def test_billion_laughs_persistent_id_is_refused_quickly(tmp_path):
    """An unknown persistent id made of shared lists: its error message must not spell it out (10^9 items)."""
    path = torch_zip(tmp_path / "laughs.pt", data_pkl=_pickle({"visual.w": _Ref(_laughs())}))
    assert path.stat().st_size < 2000
    one_line(extract(path, tmp_path))


def test_billion_laughs_dict_key_is_refused_before_hashing(tmp_path):
    """A dict key that is a tuple expanding to 10^12 items: hashing it would take hours."""
    body = _laugh_key_pickle()
    path = torch_zip(tmp_path / "laughs_key.pt", data_pkl=body)
    one_line(extract(path, tmp_path), "billion laughs")


def _deep_tuple_pickle(depth: int) -> bytes:
    # (((...),),) as a dict key, written opcode by opcode (pickling it would itself recurse that deep)
    return (b"\x80\x02}q\x00" + b"X\x01\x00\x00\x00a" + b"\x85" * depth + b"K\x01s" + b".")


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_deeply_nested_pickle_is_refused_not_a_crash(tmp_path, container):
    """A tuple nested 300000 deep used as a dict key overflows the C stack when hashed (a segmentation fault)."""
    body = _deep_tuple_pickle(300_000)
    if container == "zip":
        path = torch_zip(tmp_path / "deep.pt", data_pkl=body)
    else:
        path = tmp_path / "deep_legacy.pt"
        path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                         + pickle.dumps({"little_endian": True}, protocol=2) + body + pickle.dumps([], protocol=2))
    one_line(extract(path, tmp_path), "deep")


def test_deeply_nested_modules_are_refused_in_one_line(tmp_path):
    """Module stubs nested 3000 deep (an object per level, its _modules naming the next)."""
    import types

    mod = types.ModuleType("hostile_mods")
    sys.modules["hostile_mods"] = mod

    class Block:
        pass

    Block.__module__, Block.__qualname__ = "hostile_mods", "Block"
    mod.Block = Block
    try:
        leaf = Block()
        leaf.__dict__.update(_parameters={"weight": torch.ones(2)}, _buffers={}, _modules={})
        node = leaf
        for _ in range(3000):
            parent = Block()
            parent.__dict__.update(_parameters={}, _buffers={}, _modules={"m": node})
            node = parent
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(100_000)
        try:
            torch.save(node, tmp_path / "deep_modules.pt")
        finally:
            sys.setrecursionlimit(limit)
    finally:
        del sys.modules["hostile_mods"]
    one_line(extract(tmp_path / "deep_modules.pt", tmp_path), "deep")


def test_modules_nested_past_any_model_are_refused_by_the_walk():
    """Below the pickle's nesting bound, the module walk has its own (no recursion, bounded depth)."""
    from tvtool.formats.safe_pickle import Stub, module_state_dict

    class M(Stub):
        pass

    node = M()
    node.__dict__.update(_parameters={"w": torch.ones(1)}, _buffers={}, _modules={})
    for _ in range(100):
        parent = M()
        parent.__dict__.update(_parameters={}, _buffers={}, _modules={"m": node})
        node = parent
    with pytest.raises(TVToolError, match="nested over"):
        module_state_dict(node)
    loop = M()
    loop.__dict__.update(_parameters={}, _buffers={}, _modules={"self": None})
    loop.__dict__["_modules"]["self"] = loop
    with pytest.raises(TVToolError, match="in a loop"):
        module_state_dict(loop)


def test_pickle_scan_counts_shared_objects_and_depth():
    """The pre-scan, against Python's own unpickler: small pickles pass, laughs and depth are refused."""
    from tvtool.formats import pickle_scan

    ok = pickle.dumps({"a": [1, 2, (3, 4)], "b": list(range(100))}, protocol=4)
    pickle_scan.check(ok)
    assert pickle.loads(ok)["b"][-1] == 99
    with pytest.raises(pickle_scan.PickleShape, match="billion laughs"):
        pickle_scan.check(pickle.dumps(_laughs(8), protocol=4))
    pickle_scan.check(pickle.dumps(_laughs(6), protocol=4))  # 10^6 references: within bounds
    with pytest.raises(pickle_scan.PickleShape, match="deep"):
        pickle_scan.check(_deep_tuple_pickle(1000))
    pickle_scan.check(_deep_tuple_pickle(100))
    with pytest.raises(pickle_scan.PickleShape, match="truncated"):
        pickle_scan.check(ok[:-1])


# -------------------------------------------------------------------------------------- tangent checkpoints
def _mini_linearized(tmp_path, break_index=None, shape=None):
    from tvtool.formats.arch import register_builtin

    open_clip = register_builtin()
    torch.manual_seed(0)
    clip = open_clip.create_model("tvtool-mini")
    del clip.transformer
    named = list(clip.named_parameters())
    ckpt = {"model_name": "tvtool-mini"}
    for i, (_, p) in enumerate(named):
        ckpt[f"model.params.{i}"] = p.detach() + 0.01
        ckpt[f"model.params0.{i}"] = p.detach().clone()
    if break_index is not None:
        ckpt[f"model.params.{break_index}"] = torch.zeros(shape)
    path = tmp_path / "linear.pt"
    torch.save(ckpt, path)
    return path, named


@pytest.mark.parametrize("shape", [(1,), (3,), ()], ids=["broadcastable", "mismatched", "scalar"])
def test_tangent_params_of_the_wrong_shape_are_refused(tmp_path, shape):
    """params (fine-tuned) must have the shapes params0 and the architecture have, not be broadcast against
    them (a [1] tensor would silently become a vector of the right shape and wrong values)."""
    path, named = _mini_linearized(tmp_path)
    ok = run_tvtool("convert", path, "-o", tmp_path / "ok.safetensors")
    assert ok.returncode == 0, ok.stderr
    index = next(i for i, (n, p) in enumerate(named) if n.startswith("visual.") and p.ndim == 2)
    path, _ = _mini_linearized(tmp_path, index, shape)
    out = tmp_path / "tau.safetensors"
    one_line(run_tvtool("convert", path, "-o", out), f"parameter {index}", named[index][0])
    assert not out.exists()


def test_tangent_params_of_another_dtype_kind_are_refused(tmp_path):
    path, named = _mini_linearized(tmp_path)
    ckpt = torch.load(path)
    ckpt["model.params.0"] = ckpt["model.params.0"].to(torch.int64)
    torch.save(ckpt, path)
    one_line(run_tvtool("convert", path, "-o", tmp_path / "tau.safetensors"), "parameter 0", "floating")


# ------------------------------------------------------------------------------------ odd open_clip shapes
def _mini_state():
    from tvtool.formats.arch import register_builtin

    open_clip = register_builtin()
    torch.manual_seed(0)
    sd = open_clip.create_model("tvtool-mini").state_dict()
    return {k: v.numpy().copy() for k, v in sd.items() if k.startswith("visual.")}


@pytest.mark.parametrize("key, shape", [
    ("visual.conv1.weight", (32, 3, 4)),          # not 4-D
    ("visual.conv1.weight", (32, 3, 4, 2)),       # non-square patch
    ("visual.conv1.weight", (0, 3, 4, 4)),        # zero width
    ("visual.positional_embedding", (0, 32)),     # no tokens (tokens - 1 = -1: a complex square root)
    ("visual.positional_embedding", (6, 32)),     # 5 patches: no square grid
    ("visual.positional_embedding", (17, 48)),    # width disagrees with conv1
    ("visual.positional_embedding", (17,)),       # not 2-D
    ("visual.proj", (32,)),                        # not 2-D
    ("visual.transformer.resblocks.0.mlp.c_fc.weight", (128,)),
])
def test_odd_open_clip_shapes_are_one_line_naming_the_tensor(tmp_path, key, shape):
    state = _mini_state()
    assert key in state
    state[key] = np.zeros(shape, dtype=np.float32)
    path, tuned = tmp_path / "odd.safetensors", tmp_path / "odd_tuned.safetensors"
    save_file(state, str(path))
    save_file({k: v + 1 for k, v in state.items()}, str(tuned))
    one_line(run_tvtool("extract", "--base", path, "--finetuned", tuned, "-o", tmp_path / "tv.safetensors"), key)
    assert not (tmp_path / "tv.safetensors").exists()


def test_text_tower_shapes_are_checked_too():
    from tvtool.formats.arch import shapes_config

    state = {k: v.shape for k, v in _mini_state().items()}
    state["token_embedding.weight"] = (10,)
    state["positional_embedding"] = (8, 16)
    with pytest.raises(TVToolError, match="token_embedding.weight"):
        shapes_config(state, state.__getitem__)


# ----------------------------------------------------------------------------------------- safetensors mmap
def _vector_files(tmp_path, n=2):
    from tvtool.formats.arch import register_builtin  # noqa: F401  (tvtool-mini)

    state = _mini_state()
    paths = []
    for i in range(n):
        (tmp_path / f"ft{i}.safetensors").unlink(missing_ok=True)
        save_file({k: v + i + 1 for k, v in state.items()}, str(tmp_path / f"ft{i}.safetensors"))
    save_file(state, str(tmp_path / "base.safetensors"))
    for i in range(n):
        out = tmp_path / f"tv{i}.safetensors"
        r = run_tvtool("extract", "--base", tmp_path / "base.safetensors", "--finetuned",
                       tmp_path / f"ft{i}.safetensors", "-o", out)
        assert r.returncode == 0, r.stderr
        paths.append(out)
    return paths


def test_add_of_a_vector_truncated_after_it_was_opened_is_one_line_not_sigbus(tmp_path):
    """The file shrinks between opening (header checked, file mapped) and reading its tensors: reading a mapped
    page past the end of a file is SIGBUS, which kills the process and leaves its temp behind."""
    a, b = _vector_files(tmp_path)
    out = tmp_path / "sum.safetensors"
    script = textwrap.dedent(f"""
        import os, sys
        import tvtool.taskvector as tv
        from tvtool.errors import TVToolError
        real = tv.open_vector
        def open_then_truncate(p):
            v = real(p)
            if str(p) == {str(b)!r}:
                os.truncate(p, os.path.getsize(p) // 2)
            return v
        tv.open_vector = open_then_truncate
        try:
            tv.add([{str(a)!r}, {str(b)!r}], {str(out)!r}, alpha=0.3)
        except TVToolError as exc:
            print("ERR", exc)
            sys.exit(1)
        print("no error")
    """)
    r = run_python(script)
    assert r.returncode == 1 and r.stdout.startswith("ERR"), (r.returncode, r.stdout, r.stderr[-2000:])
    assert "changed" in r.stdout and str(b) in r.stdout
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")], os.listdir(tmp_path)


def test_safetensors_views_check_the_file_size_first(tmp_path):
    (a,) = _vector_files(tmp_path, 1)
    script = textwrap.dedent(f"""
        import os
        from tvtool.safetensors_io import SafetensorsFile
        from tvtool.errors import TVToolError
        f = SafetensorsFile({str(a)!r})
        keys = f.keys()
        os.truncate({str(a)!r}, 100)
        for how in ("array", "get"):
            try:
                getattr(f, how)(keys[-1]).sum()
            except TVToolError as exc:
                print("ERR", how, exc)
    """)
    r = run_python(script)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.count("ERR") == 2 and "changed" in r.stdout, r.stdout


def test_safetensors_header_promising_more_than_the_file_holds(tmp_path):
    (a,) = _vector_files(tmp_path, 1)
    os.truncate(a, a.stat().st_size - 4)
    one_line(run_tvtool("add", a, a, "-o", tmp_path / "sum.safetensors"), "truncated")


def test_safetensors_header_error_messages_are_bounded(tmp_path):
    """A header naming a 100 KB key or a shape of 10^5 items is refused without quoting it whole."""
    for header in ({"k" * 100_000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                   {"w": {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}},
                   {"w": {"dtype": "F32" * 10_000, "shape": [1], "data_offsets": [0, 4]}}):
        raw = json.dumps(header).encode()
        path = tmp_path / "h.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
        one_line(run_tvtool("inspect", path))


# ------------------------------------------------------------------------------------------------ JSON files
DEEP = "[" * 100_000 + "]" * 100_000


def _transformers_folder(tmp_path, config_text):
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(config_text)
    save_file({"vision_model.embeddings.patch_embedding.weight": np.zeros((4, 3, 2, 2), np.float32)},
              str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("text, words", [
    (DEEP, ["nested"]),
    ('{"model_type": "clip", "x": ' + "[" * 5000 + "]" * 5000 + "}", ["nested"]),
])
def test_deeply_nested_config_json_is_one_line(tmp_path, text, words):
    folder = _transformers_folder(tmp_path, text)
    one_line(extract(folder, tmp_path), "config.json", *words)


def test_huge_config_json_is_refused_before_reading(tmp_path):
    folder = _transformers_folder(tmp_path, "{}")
    with open(folder / "config.json", "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GB of NUL bytes, which the limited run could not read into memory
    one_line(extract(folder, tmp_path), "config.json", "bytes")


@pytest.mark.parametrize("text", [DEEP, '{"weight_map": ' + "{\"a\": " * 3000 + "1" + "}" * 3000 + "}"])
def test_deeply_nested_index_is_one_line(tmp_path, text):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(text)
    one_line(extract(folder, tmp_path), "model.safetensors.index.json")
    one_line(extract(folder / "model.safetensors.index.json", tmp_path), "model.safetensors.index.json")


def test_deeply_nested_adapter_config_is_one_line(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(DEEP)
    save_file({"x": np.zeros(1, np.float32)}, str(folder / "adapter_model.safetensors"))
    one_line(extract(folder, tmp_path), "adapter_config.json", "nested")


def test_open_clip_config_json_of_the_wrong_type_is_one_line(tmp_path):
    state = _mini_state()
    folder = tmp_path / "oc"
    folder.mkdir()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    for text in (DEEP, '{"model_cfg": 3}', "[1, 2]"):
        (folder / "open_clip_config.json").write_text(text)
        r = run_tvtool("convert", folder, "-o", tmp_path / "out_folder")
        one_line(r, "open_clip_config.json")


def test_read_json_bounds(tmp_path):
    from tvtool.fileio import read_json

    p = tmp_path / "a.json"
    p.write_text(json.dumps({"a": [[[1]]]}))
    assert read_json(p, "a config") == {"a": [[[1]]]}
    with pytest.raises(TVToolError, match="nested"):
        read_json(p, "a config", max_depth=3)
    with pytest.raises(TVToolError, match="bytes"):
        read_json(p, "a config", limit=5)
    p.write_bytes(b"\xff{}")
    with pytest.raises(TVToolError, match="UTF-8"):
        read_json(p, "a config")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(TVToolError, match="FIFO"):
        read_json(tmp_path / "fifo.json", "a config")


@pytest.mark.parametrize("patterns, words", [
    ({"(a+)+$": 4}, "nests quantifiers"),          # exponential backtracking on a near-miss module name
    ({"visual.(": 4}, "not a regular expression"),
    ({"visual.proj": -1}, "positive number"),
    ([1, 2], "not an object"),
])
def test_peft_rank_patterns_are_checked_before_matching(tmp_path, patterns, words):
    from tvtool.formats.peft_lora import _check_config

    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": patterns}
    with pytest.raises(TVToolError, match=words):
        _check_config(tmp_path, cfg)
    _check_config(tmp_path, {**cfg, "rank_pattern": {"visual.transformer.resblocks.0.attn.out_proj": 8,
                                                     r"resblocks\.\d+\.mlp": 2}})


@pytest.fixture(scope="module")
def hf_vision_folder(tmp_path_factory):
    from hf_helpers import vision_model

    folder = tmp_path_factory.mktemp("hf") / "vision"
    vision_model().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("hidden_size", "wide"),
                                          ("patch_size", 10 ** 30), ("projection_dim", None)])
def test_transformers_config_values_are_checked(hf_vision_folder, tmp_path, field, value):
    """config.json's sizes feed divisions and, later, allocations: a zero, a string or 10^30 is one line."""
    import shutil

    folder = tmp_path / "vision"
    shutil.copytree(hf_vision_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.safetensors"
    one_line(run_tvtool("convert", folder, "-o", out), "config.json")
    assert not out.exists()
