"""Streaming `tvtool add` / `tvtool inspect --cosine` against a naive load-everything script, in one run.

    python benchmarks/bench_vectors.py                 # 8 vectors shaped like ViT-L-14's visual tower (~303M fp32 each)
    python benchmarks/bench_vectors.py --layers 4      # smaller, for a quick check

Each measurement runs in a fresh subprocess; wall time and that child's peak RSS are reported. Files are written
once; before every timed run they are read once so each contender starts from a warm page cache; the best of
--repeat runs is reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAIVE_ADD = r"""
import sys, torch
from safetensors.torch import load_file, save_file
paths, out = sys.argv[1:-1], sys.argv[-1]
sds = [load_file(p) for p in paths]
total = {k: sum(sd[k] for sd in sds) * 0.3 for k in sds[0]}
save_file(total, out)
"""

NAIVE_COSINE = r"""
import sys, torch, json
from safetensors.torch import load_file
sds = [load_file(p) for p in sys.argv[1:]]
flat = [torch.cat([sd[k].reshape(-1) for k in sorted(sd)]) for sd in sds]
n = len(flat)
cos = [[float(torch.dot(flat[i], flat[j]) / (flat[i].norm() * flat[j].norm())) for j in range(n)] for i in range(n)]
print(json.dumps(cos))
"""


def vit_l14_visual_shapes(layers: int = 24, width: int = 1024) -> dict[str, tuple]:
    shapes = {"visual.conv1.weight": (width, 3, 14, 14), "visual.positional_embedding": (257, width),
              "visual.class_embedding": (width,), "visual.proj": (width, 768)}
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                       p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                       p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                       p + "ln_2.bias": (width,), p + "mlp.c_fc.weight": (4 * width, width),
                       p + "mlp.c_fc.bias": (4 * width,), p + "mlp.c_proj.weight": (width, 4 * width),
                       p + "mlp.c_proj.bias": (width,)})
    return shapes


def make_vectors(folder: Path, n: int, layers: int) -> list[Path]:
    import torch

    from tvtool import taskvector as tv

    shapes = vit_l14_visual_shapes(layers)
    meta = tv.new_meta({"model": "ViT-L-14", "pretrained": "random", "fingerprint": "fp1:bench"}, tasks=["t"])
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        specs = {k: (torch.float32, s) for k, s in shapes.items()}
        items = ((k, torch.randn(s, generator=g) * 1e-3) for k, s in shapes.items())
        p = folder / f"v{i}.st"
        if p.exists() and tv.open_vector(p).numel() == sum(math.prod(s) for s in shapes.values()):
            paths.append(p)  # reuse the inputs of an earlier run with the same shapes
            continue
        tv.write_vector(p, items, {**meta, "tasks": [f"t{i}"]}, specs=specs)
        paths.append(p)
    return paths


def warm_page_cache(paths: list[Path]) -> None:
    buf = bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_measured(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="number of vectors")
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (24 = ViT-L-14)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per contender (best is reported)")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--breakdown-only", action="store_true", help="only the start-up / read / in-process figures")
    args = ap.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="tvbench-"))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = make_vectors(folder, args.n, args.layers)
    from tvtool.taskvector import open_vector

    params = open_vector(paths[0]).numel()
    print(f"wrote {args.n} vectors of {params / 1e6:.1f}M fp32 parameters in {time.perf_counter() - t0:.0f}s")
    # where the time goes: start-up, one plain read of the inputs, the streaming add inside this process
    py = sys.executable
    startup, _ = run_measured([py, "-c", "import tvtool.cli"])
    print(f"start-up (python -c 'import tvtool.cli'): {startup:.2f} s", flush=True)
    warm_page_cache(paths)
    t0 = time.perf_counter()
    warm_page_cache(paths)
    print(f"one plain read of all inputs (page cache -> a 16 MB buffer): {time.perf_counter() - t0:.2f} s", flush=True)
    from tvtool import taskvector as tv

    t0 = time.perf_counter()
    tv.add(paths, folder / "inproc_sum.st", alpha=0.3, force=True)
    print(f"tvtool add inside an already started process: {time.perf_counter() - t0:.2f} s", flush=True)
    if args.breakdown_only:
        return
    contenders = {
        "add: naive": [py, "-c", NAIVE_ADD, *map(str, paths), str(folder / "naive_sum.st")],
        "add: tvtool": [py, "-m", "tvtool", "add", *map(str, paths), "--alpha", "0.3", "-o", str(folder / "tv_sum.st"),
                        "--force"],
        "cosine: naive": [py, "-c", NAIVE_COSINE, *map(str, paths)],
        "cosine: tvtool": [py, "-m", "tvtool", "inspect", "--cosine", "--json", *map(str, paths)],
    }
    results = {}
    for name, cmd in contenders.items():
        best = None
        for _ in range(args.repeat):
            (folder / "naive_sum.st").unlink(missing_ok=True)
            warm_page_cache(paths)  # every contender starts from the same warm cache, outside its timing
            w, rss = run_measured(cmd)
            best = (w, rss) if best is None or w < best[0] else best
        results[name] = best
        print(f"{name:16s} wall {best[0]:7.2f} s   peak RSS {best[1]:6.2f} GiB", flush=True)
    for op in ("add", "cosine"):
        nw, nr = results[f"{op}: naive"]
        tw, tr = results[f"{op}: tvtool"]
        print(f"{op}: tvtool is {nw / tw:.2f}x faster, uses {tr / nr:.3f}x the peak memory of naive")
    print(json.dumps({k: {"wall_s": v[0], "peak_rss_gib": v[1]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
