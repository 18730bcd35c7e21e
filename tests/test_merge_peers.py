"""Merge methods against their authors' code: FusionBench 0.2.33's copies of TSV-M, Iso-C, Iso-CTS, WUDI and TIES.

The wheel is fetched from the package registry into a temporary folder (nothing is installed), unzipped, and only
the pure-tensor modules are loaded by file path; the few FusionBench names they import are stubbed. Inputs are
random, options matched; agreement is to float32 rounding (about 1e-6 of the values' scale).
"""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from peer_helpers import load_by_path, sys_modules_restored
from tvtool import merge as mg



def _stub_modules() -> dict[str, types.ModuleType]:
    """The FusionBench names the loaded modules import, as inert stand-ins (none of them is called for merging)."""
    class _Base:
        def __init__(self, *args, **kwargs):
            pass

    class _Mixin:
        pass

    @contextlib.contextmanager
    def timeit_context(*args, **kwargs):
        yield

    def _mods(**spec):
        out = {}
        for name, attrs in spec.items():
            mod = types.ModuleType(name)
            mod.__path__ = []  # a package, so submodules resolve
            mod.__dict__.update(attrs)
            out[name] = mod
        return out

    def _unused(*args, **kwargs):
        raise AssertionError("not part of the merge maths")

    return _mods(**{
        "fusion_bench": {"BaseAlgorithm": _Base, "BaseModelPool": _Base, "auto_register_config": lambda cls: cls},
        "fusion_bench.mixins": {"LightningFabricMixin": _Mixin},
        "fusion_bench.utils": {"timeit_context": timeit_context},
        "fusion_bench.utils.type": {"StateDictType": dict},
        "fusion_bench.utils.state_dict_arithmetic": {"state_dict_add": _unused, "state_dict_sub": _unused,
                                                     "state_dict_mul": _unused},
    })


def _quiet_tqdm(iterable=None, **kwargs):
    return iterable


_quiet_tqdm.write = lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def fusionbench(fusionbench_src):
    """FusionBench's merge modules, loaded by path from the wheel: {"iso": ..., "tsvm": ..., "wudi": ..., "ties": ...}."""
    root = fusionbench_src / "fusion_bench" / "method"
    files = {"iso": "isotropic_merging/iso_utils.py", "tsvm": "task_singular_vector/utils/TSVM_utils.py",
             "wudi": "wudi/wudi.py", "ties": "ties_merging/ties_merging_utils.py"}
    stubs = _stub_modules()
    stubs["tqdm"] = types.ModuleType("tqdm")  # wudi.py imports it; replaced by a silent stand-in below
    stubs["tqdm"].tqdm = _quiet_tqdm
    with sys_modules_restored(stubs):
        sys.modules.update(stubs)
        out = {short: load_by_path(f"_fusionbench_{short}", root / rel, register=False) for short, rel in files.items()}
    out["wudi"].tqdm = _quiet_tqdm  # its progress bars would only fill the test log
    return out


def _vectors(t_count, shapes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) * scale * (1 + i % 3) for k, s in shapes.items()} for i in range(t_count)]


SHAPES = {"tall": (24, 10), "wide": (9, 20), "square": (12, 12), "bias": (10,), "conv": (2, 3, 2), "scalar": ()}


def _assert_close(ours: dict, theirs: dict, rel=2e-6):
    """Each tensor equal to float32 rounding relative to its scale."""
    assert ours.keys() == theirs.keys()
    for k in ours:
        a, b = ours[k].double(), theirs[k].double()
        scale = float(b.abs().max()) or 1.0
        err = float((a - b).abs().max())
        assert err <= rel * scale, (k, err, scale)


@pytest.mark.parametrize("t_count", [2, 3, 5])
def test_tsv_equals_fusionbench_tsvm(fusionbench, t_count):
    vecs = _vectors(t_count, SHAPES, seed=t_count)
    theirs = fusionbench["tsvm"].compute_and_sum_svd_mem_reduction(vecs, exclude_keys=[], accelerator="cpu")
    _assert_close(mg.merge_tensors("tsv", vecs), theirs, rel=2e-5)  # three SVDs deep: a little more rounding
    assert not torch.allclose(mg.merge_tensors("tsv", vecs, {"fallback": "sum"})["bias"], theirs["bias"])


@pytest.mark.parametrize("t_count", [2, 4])
def test_iso_c_equals_fusionbench(fusionbench, t_count):
    vecs = _vectors(t_count, SHAPES, seed=10 + t_count)
    theirs = fusionbench["iso"].iso_c(vecs, accelerator="cpu")
    _assert_close(mg.merge_tensors("iso-c", vecs), theirs, rel=1e-5)


@pytest.mark.parametrize("t_count,fraction", [(3, 0.8), (4, 0.8), (4, 0.5), (2, 0.3)])
def test_iso_cts_equals_fusionbench(fusionbench, t_count, fraction):
    # min(m, n) = 10 with T = 4 and 0.8 hits the authors' half-to-even rounding: the task part rounds to 0
    shapes = {"tall": (24, 10), "wide": (12, 20), "square": (16, 16), "bias": (10,)}
    vecs = _vectors(t_count, shapes, seed=20 + t_count)
    theirs = fusionbench["iso"].iso_cts(vecs, common_space_fraction=fraction, accelerator="cpu")
    ours = mg.merge_tensors("iso-cts", vecs, {"fraction": fraction})
    _assert_close({k: ours[k] for k in ("bias", "tall")}, {k: theirs[k] for k in ("bias", "tall")}, rel=2e-5)
    # Where a task's kept and dropped singular values lie close, float32 rounding moves the chosen subspaces of
    # both codes by ~1e-4 (a property of the inputs, not of either code): the identity is checked in float64,
    # where the two agree to 1e-9, and float32 to the size of that sensitivity.
    exact = fusionbench["iso"].iso_cts([{k: v.double() for k, v in d.items()} for d in vecs],
                                       common_space_fraction=fraction, accelerator="cpu")
    fn = mg.get_method("iso-cts").fn
    for k in ("tall", "wide", "square"):
        ours64 = fn([v[k].double() for v in vecs], k, fraction=fraction, fallback="mean", rtol=None)
        torch.testing.assert_close(ours64, exact[k], rtol=0, atol=1e-9 * float(exact[k].abs().max()))
    _assert_close(ours, theirs, rel=1e-3)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_wudi_equals_fusionbench(fusionbench, scale):
    # scale 1e-3 is a real task vector's: 300 steps of lr 1e-5 then move the merge by about its own size
    shapes = {"tall": (20, 8), "wide": (6, 14), "bias": (8,)}
    vecs = _vectors(4, shapes, seed=30, scale=scale)
    theirs = fusionbench["wudi"].wudi_merging([{k: v.clone() for k, v in d.items()} for d in vecs],
                                              accelerator="cpu", iter_num=300)
    theirs = {k: v.detach() for k, v in theirs.items()}
    ours = mg.merge_tensors("wudi", vecs)
    _assert_close(ours, theirs, rel=1e-5)
    total = {k: sum(v[k] for v in vecs) for k in shapes}
    moved = float((ours["tall"] - total["tall"]).abs().max())
    assert moved > 0.3 * 300 * 1e-5  # the optimization did move the merge (Adam: about lr per step at most)


@pytest.mark.parametrize("k,how", [(20, "mean"), (60, "sum")])
def test_ties_equals_fusionbench_at_matched_cut(fusionbench, k, how):
    """FusionBench's (and the TIES authors') cut keeps floor(N k/100) + 1 entries; tvtool keeps exactly
    floor(N k/100), so the comparison asks tvtool for one more."""
    shapes = {"a": (16, 9), "b": (30,), "c": (3, 4, 5)}
    vecs = _vectors(4, shapes, seed=40)
    keys = sorted(shapes)  # FusionBench flattens the state dict in sorted key order
    flat = torch.stack([torch.cat([v[key].reshape(-1) for key in keys]) for v in vecs])
    n = flat.shape[1]
    theirs = fusionbench["ties"].ties_merging(flat, reset_thresh=k, merge_func=f"dis-{how}")
    matched = 100.0 * (int(n * k / 100) + 1) / n
    ours = mg.merge_tensors("ties", vecs, {"k": matched, "disjoint": how})
    ours_flat = torch.cat([ours[key].reshape(-1) for key in keys])
    torch.testing.assert_close(ours_flat, theirs, rtol=1e-6, atol=1e-7)
