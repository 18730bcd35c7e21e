"""Time and peak memory of `tvtool merge` per method on T random vectors shaped like ViT-B-32's visual tower.

    python benchmarks/bench_merge.py --methods sum,mean,ties,dare,dare-ties,breadcrumbs,consensus,iso-c
    python benchmarks/bench_merge.py --size 0.5 --methods tsv,iso-c   # TSV's 10 SVDs per layer: ~8 min at 1.0
    python benchmarks/bench_merge.py --size 0.5 --methods sum,iso-c,iso-cts,della,breadcrumbs-ties,lines
    python benchmarks/bench_merge.py --size 0.25 --methods sum,iso-c,wudi  # WUDI: 300 Adam steps per layer
    python benchmarks/bench_merge.py --data-model ViT-B-32 --methods sum,regmean,fisher   # data-aware (below)

--size scales the tower's width (1.0 = ViT-B-32: width 768, 12 blocks; parameters grow as size^2, the per-layer
methods' work as size^3). Every method runs with its default options (`tvtool merge --list`), on the GPU when the
method uses one and there is one (tsv, iso-c, iso-cts, wudi; `benchmarks/gpu_suite.py` times GPU against CPU).
Each method runs in a fresh process that reports its own wall time and peak RSS (ru_maxrss), next to an idle process that only
imports tvtool (the interpreter + torch floor). Inputs are written once to a temporary folder (deleted after) and
read memory-mapped, as the CLI does; after the first run they sit in the page cache.

The data-aware methods (regmean, fisher) need a model and each task's training images: with ``--data-model M``
(``tvtool-mini``, or ``ViT-B-32`` etc. with random weights) the vectors are random updates of M's image tower, one
per mini-world task (``--vectors`` of the 8, rendered at M's image size; the image cache is built before any timing),
and each method runs through ``tvtool.data_merge.merge_with_data`` with its default options (256 images per task),
the model loaded before the clock starts; ``sum`` on the same files is the floor. ``adamerging`` times 20 of its Adam
steps (layer-wise, 16 test images per task per step; its default run is 500), after the test images are loaded.
``--device cuda`` when lent.
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

def vit_b32_visual_shapes(size: float) -> dict[str, tuple]:
    """State-dict shapes of open_clip ViT-B-32's visual tower, width scaled by ``size`` (heads of 64)."""
    w = max(64, int(round(768 * size / 64)) * 64)
    out_dim = max(64, int(round(512 * size / 64)) * 64)
    shapes = {"visual.class_embedding": (w,), "visual.positional_embedding": (50, w), "visual.proj": (w, out_dim),
              "visual.conv1.weight": (w, 3, 32, 32), "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,)}
    for i in range(12):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                       p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                       p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                       p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                       p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                       p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,)})
    shapes.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)})
    return shapes


def write_inputs(folder: Path, count: int, size: float) -> list[Path]:
    import torch

    from tvtool import taskvector as tv

    shapes = vit_b32_visual_shapes(size)
    specs = {k: (torch.float32, s) for k, s in shapes.items()}
    base = {"model": "ViT-B-32", "pretrained": "bench", "fingerprint": "fp1:0000000000000000"}
    paths = []
    for t in range(count):
        gen = torch.Generator().manual_seed(t)
        # task vectors are small updates with a few large entries; scale varies by task
        items = ((k, torch.randn(s, generator=gen) * (1e-3 * (1 + t))) for k, s in shapes.items())
        p = folder / f"task{t}.st"
        meta = tv.new_meta(base, tasks=[f"task{t}"], mode="full")
        # random normals are finite: skip the writer's isfinite scan, which dominates writing the inputs
        tv.write_safetensors(p, items, specs, {tv.META_KEY: json.dumps(meta)}, fingerprint_key="fingerprint",
                             check_finite=False)
        paths.append(p)
    return paths


ADA_STEPS = 20  # AdaMerging's default is 500: the table reports the time of these and per step

MINI_TASKS = ["mini-digits", "mini-mnist", "mini-shapes", "mini-textures", "mini-colors", "mini-glyphs",
              "mini-orientations", "mini-counts"]


def load_model(model: str, device: str = "cpu"):
    """``model`` with its builtin weights (tvtool-mini) or a random initialisation drawn from seed 0, so that the
    process writing the vectors and each timed child load the same base."""
    import torch

    from tvtool.models import load_clip

    torch.manual_seed(0)
    return load_clip(model, "builtin" if model == "tvtool-mini" else "random", device=device)


def write_model_inputs(folder: Path, count: int, model: str) -> list[Path]:
    """``count`` random updates of ``model``'s image tower, each recorded as fine-tuned on a mini task, and every
    task's training images cached at the model's size (outside the timings)."""
    import torch

    from tvtool import taskvector as tv
    from tvtool.datasets import open_split

    bundle = load_model(model)
    state = {k: v for k, v in bundle.model.state_dict().items() if k.startswith("visual.") and v.is_floating_point()}
    base = {"model": bundle.name, "pretrained": bundle.pretrained, "fingerprint": bundle.fingerprint}
    paths = []
    for t, task in enumerate(MINI_TASKS[:count]):
        open_split(task, "train", None, bundle.image_size)
        gen = torch.Generator().manual_seed(t)
        tensors = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in state.items()}
        meta = tv.new_meta(base, tasks=[task], mode="full",
                           history=[tv.history_entry("finetune", task=task, mode="full", steps=1)])
        paths.append(folder / f"{task}.st")
        tv.write_vector(paths[-1], tensors, meta)
    return paths


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss keeps the forking parent's
    resident size, so a parent holding a model would set every child's floor)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(method: str, out: str, paths: list[str], threads: int, data_model: str | None = None,
          device: str = "cpu") -> None:
    import torch

    torch.set_num_threads(threads)
    from tvtool.merge import merge_files

    bundle = None
    if data_model and method not in ("idle", "sum"):
        bundle = load_model(data_model, device)  # loading the model is not the method's time
    learner = None
    if bundle is not None and method == "adamerging":  # test-time adaptation: its Adam steps are the time
        from tvtool import evaluate
        from tvtool.adamerging import AdaMerging

        vectors = evaluate.open_vectors(paths)
        tasks = [v.meta["tasks"][0] for v in vectors]
        ev = evaluate.Evaluator(bundle, tasks, splits=("test",), device=device)
        learner = AdaMerging(ev, vectors, {"steps": ADA_STEPS})
    start = time.perf_counter()
    if learner is not None:
        learner.fit()
    elif bundle is not None:
        from tvtool.data_merge import merge_with_data

        merge_with_data(method, paths, out, bundle=bundle, device=device, force=True)
    elif method != "idle":
        merge_files(method, paths, out, force=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    rss_mb = peak_rss_mb()
    print(json.dumps({"method": method, "wall_s": wall, "peak_rss_mb": rss_mb}))


def run_child(method, out, paths, threads, timeout, data_model=None, device="cpu"):
    cmd = [sys.executable, __file__, "--child", method, "--out", str(out), "--threads", str(threads),
           "--device", device, *(["--data-model", data_model] if data_model else []), *map(str, paths)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"method": method, "wall_s": None, "peak_rss_mb": None, "note": f"over {timeout}s"}
    except subprocess.CalledProcessError as exc:
        return {"method": method, "wall_s": None, "peak_rss_mb": None, "note": exc.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="width scale; 1.0 = ViT-B-32 (~88M params/vector)")
    ap.add_argument("--vectors", type=int, default=8)
    ap.add_argument("--methods", default="sum,mean,ties,dare,dare-ties,breadcrumbs,breadcrumbs-ties,della,consensus,"
                                         "tsv,iso-c,iso-cts,wudi,lines")
    # 1 thread by default: on a shared 2-core machine, multi-threaded LAPACK oversubscribes and runs 2-20x slower
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=400, help="per-method limit in seconds")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--data-model", default=None,
                    help="time the data-aware methods on this model's tower (tvtool-mini, ViT-B-32, ...) and the "
                         "mini tasks' images instead of --size's random vectors")
    ap.add_argument("--device", default="cpu", help="where the data-aware methods run (cpu, cuda)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.out, args.paths, args.threads, args.data_model, args.device)
        return

    methods = [m for m in args.methods.split(",") if m]
    size = args.size
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_merge.") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("TVTOOL_CACHE", str(folder / "cache"))  # the mini tasks' images, for --data-model
        t0 = time.perf_counter()
        if args.data_model:
            paths = write_model_inputs(folder, args.vectors, args.data_model)
            from tvtool.taskvector import open_vector

            first = open_vector(paths[0])
            n_params = sum(math.prod(first.shape(k)) for k in first.keys())
            first.close()
            what = f"{args.data_model} (random updates of its tower), mini tasks' images cached"
        else:
            paths = write_inputs(folder, args.vectors, size)
            n_params = sum(math.prod(s) for s in vit_b32_visual_shapes(size).values())
            what = f"size {size}"
        print(f"{what}: {len(paths)} vectors x {n_params / 1e6:.1f}M fp32 params written in "
              f"{time.perf_counter() - t0:.1f}s; {args.threads} thread(s)", flush=True)
        print("| method | wall | peak RSS |", flush=True)
        for m in ["idle"] + methods:
            r = run_child(m, folder / "out.st", paths, args.threads, args.timeout, args.data_model, args.device)
            r.update(size=size, params_per_vector=n_params, vectors=len(paths), threads=args.threads,
                     data_model=args.data_model, device=args.device)
            results.append(r)
            wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f} s"
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} MB"
            print(f"| {m} | {wall} | {rss} | {r.get('note', '')}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
