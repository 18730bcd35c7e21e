"""The input path at real sizes: peak memory and wall time of the cache build, fine-tuning steps and an evaluation
pass as the split grows, and training throughput of the streamed path against the device-resident one.

    python benchmarks/bench_data.py                                   # N = 2000,16000,64000 (about 12 GB of disk)
    python benchmarks/bench_data.py --sizes 500,2000 --steps 5        # a quick look
    python benchmarks/bench_data.py --sizes 2000 --device cuda --ratio-batch 128   # the GPU ratio (issue 22's goal)

Fabricates max(N) 256x256 JPEG files (smooth random colour fields with noise, 10 classes; 2,000 distinct images,
the other files hard links to them) in a work folder (outside every timing), then for each N registers the first N of them as an ImageFolder dataset and runs, each phase in a
fresh child process so that its peak RSS (``ru_maxrss``) is its own:

1. **build** - ``open_split(task, "train")`` into an empty ``$TVTOOL_CACHE``: listing, decoding at 224 px by the
   decoding workers (``--workers``), the cache file written chunk by chunk. Peak RSS of the parent and of the largest
   decoding worker.
2. **train** - ``tvtool.train.finetune`` for ``--steps`` steps at ``--batch`` (``eval=False``), streaming
   (``data_on_device="no"``): images/s over the steps after the first, wall time of the whole call.
3. **eval** - one ``Evaluator.accuracy`` pass over the same split, streamed.

The model for these is a small random-weight ViT at 224 px (patch 32, 2 blocks of width 128; registered from a JSON
config in the work folder) so that a 64k-image evaluation pass fits in minutes on a CPU and the data path dominates;
**model** is its peak RSS with no data path (20 steps on one random batch), the "model's own". At the smallest N
the benchmark also runs **train held** (``data_on_device="yes"``: the whole split in memory, the old path) with the
small ViT and, for a real step, both train arms with ``--ratio-model`` (default ViT-B-32, random weights) at
``--ratio-batch`` for ``--ratio-steps``: the streamed / held images/s ratios, measured in the same run (the arms alternated ``--repeats``
times, the best run of each arm counted: other processes' load comes and goes on a shared machine).

Prints a markdown table and one JSON line (``--json-out`` also writes it). Each N's cache is deleted after its
phases; ``--keep`` keeps the work folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "bench-data"
CLASSES = 10
TINY = "bench-vit-tiny-224"
TINY_CONFIG = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 32,
                                               "patch_size": 32},
               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
JPEG_BYTES = 25_000  # about what a fabricated 256x256 JPEG takes (for the disk check)


# ------------------------------------------------------------------------------------------------ fabrication
def fabricate(root: Path, n: int, seed: int = 0, processes: int = 1, unique: int = 2000) -> None:
    """``n`` JPEGs ``class_k/img{i:07d}.jpg`` (k = i % 10): ``unique`` drawn images (image i from seed (seed, i)),
    the rest hard links to them (image i -> image i % unique), so 64k files cost 2k encodes and their disk."""
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(root, seed, a, min(a + 500, unique, n)) for a in range(0, min(unique, n), 500)]
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.starmap(_fabricate_range, jobs)
    else:
        for job in jobs:
            _fabricate_range(*job)
    for i in range(unique, n):
        path = root / f"class_{i % CLASSES}" / f"img{i:07d}.jpg"
        if not path.exists():
            j = i % unique
            os.link(root / f"class_{j % CLASSES}" / f"img{j:07d}.jpg", path)


def _fabricate_range(root: Path, seed: int, start: int, stop: int) -> None:
    import numpy as np
    from PIL import Image

    for i in range(start, stop):
        path = root / f"class_{i % CLASSES}" / f"img{i:07d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng((seed, i))
        field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(field).resize((256, 256), Image.BICUBIC)
        noise = rng.integers(-12, 13, (256, 256, 3))
        pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)


def register(root: Path, n: int) -> None:
    """The first ``n`` fabricated images as dataset ``TASK`` (class names in code), and the small ViT's config."""
    import open_clip

    from tvtool.datasets import DatasetSpec, register as add
    from tvtool.datasets.base import image_folder

    names = [f"class {c}" for c in range(CLASSES)]

    class Spec(DatasetSpec):
        classnames = property(lambda self: names)
        templates = property(lambda self: ["a photo of a {c}."])

    def listing(split: str, data_root: Path):
        return image_folder(TASK, data_root, data_root, keep=lambda f: int(f[3:10]) < n)[1]

    add(Spec(name=TASK, listing=listing, epochs=1000))
    config = root.parent / f"{TINY}.json"
    if TINY not in open_clip.list_models():
        open_clip.add_model_config(config)


# ------------------------------------------------------------------------------------------------ phases (children)
def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def phase(args) -> dict:
    import torch

    root, n = Path(args.root), args.n
    register(root, n)
    out: dict = {"phase": args.phase, "n": n}
    t0 = time.perf_counter()
    if args.phase == "build":
        from tvtool.datasets import open_split

        data = open_split(TASK, "train", root, 224)
        out.update(examples=len(data), cache_bytes=os.path.getsize(data.path),
                   workers_peak_rss_mb=peak_mb(resource.RUSAGE_CHILDREN))
    elif args.phase == "train":
        from tvtool.train import TrainConfig, finetune

        marks = {}

        def progress(r):
            marks[r["step"]] = time.perf_counter()

        cfg = TrainConfig(task=TASK, model=args.model, pretrained="random", batch_size=args.batch, max_steps=args.steps,
                          warmup_steps=2, eval=False, log_every=1, device=args.device, data_on_device=args.placement,
                          data_root=str(root))
        res = finetune(cfg, Path(args.work) / f"v-{os.getpid()}.st", progress=progress, stop_after=args.steps)
        timed = args.steps - 1
        out.update(model=args.model, placement=args.placement, batch=args.batch, steps=res.steps,
                   images_per_s=timed * args.batch / (marks[args.steps] - marks[1]))
    elif args.phase == "eval":
        from tvtool.evaluate import Evaluator
        from tvtool.models import load_clip

        bundle = load_clip(args.model, "random", device=args.device)
        ev = Evaluator(bundle, [TASK], str(root), device=args.device, batch_size=256, data_on_device="no")
        t1 = time.perf_counter()
        ev.accuracy(TASK, "train")
        n_eval = ev.inputs(TASK, "train")[1].numel()
        out.update(model=args.model, examples=n_eval, images_per_s=n_eval / (time.perf_counter() - t1))
    elif args.phase == "model":  # the model's own: no data path, the same steps on one random batch
        from tvtool import heads, variants
        from tvtool.models import load_clip

        bundle = load_clip(args.model, "random", device="cpu")
        head = torch.randn(CLASSES, bundle.model.visual.output_dim)
        tuned = variants.prepare(bundle.model, "full")
        clf = heads.ImageClassifier(tuned.module, head)
        params = [p for _, p in tuned.named_trainable()]
        opt = torch.optim.AdamW(params, lr=1e-5)
        x = torch.randn(args.batch, 3, 224, 224)
        y = torch.randint(0, CLASSES, (args.batch,))
        for _ in range(args.steps):
            torch.nn.functional.cross_entropy(clf(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.update(model=args.model)
    out.update(wall_s=time.perf_counter() - t0, peak_rss_mb=peak_mb())
    return out


def run_child(args, **kw) -> dict:
    argv = [sys.executable, __file__, "--child", "--root", str(args.root_dir), "--work", str(args.work_dir),
            "--steps", str(kw.pop("steps", args.steps))]
    kw.setdefault("device", args.device)
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    env = {**os.environ, "TVTOOL_CACHE": str(args.cache_dir), "TVTOOL_DECODE_WORKERS": str(args.workers),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"phase {kw} failed:\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {result}", file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------------------------------------ orchestration
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,16000,64000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratio-model", default="ViT-B-32", help="Model of the second throughput ratio ('none': only the "
                                                              "small ViT's).")
    ap.add_argument("--ratio-batch", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="Where training and evaluation run (cuda: the GPU goal, e.g. "
                                                    "--sizes 2000 --ratio-batch 128).")
    ap.add_argument("--ratio-steps", type=int, default=8, help="Steps of the --ratio-model arms.")
    ap.add_argument("--repeats", type=int, default=2, help="Runs of each arm of the throughput ratios.")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", default=None, help="Where images and caches go (default: a temp folder).")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json-out", default=None)
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=TINY, help=argparse.SUPPRESS)
    ap.add_argument("--placement", default="no", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(phase(args)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tvbench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    need = max(sizes) * (3 * 224 * 224 + 8) + 2000 * JPEG_BYTES + (1 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: needs about {need / 1e9:.1f} GB free, has {free / 1e9:.1f} GB; pass --workdir on "
                         "a larger disk or smaller --sizes")
    args.root_dir, args.work_dir = work / "jpegs", work
    (work / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    t = time.perf_counter()
    fabricate(args.root_dir, max(sizes), processes=args.workers)
    print(f"fabricated {max(sizes)} JPEGs in {time.perf_counter() - t:.0f} s under {work}", file=sys.stderr)
    rows, ratios = [], {}
    try:
        for n in sizes:
            args.cache_dir = work / f"cache-{n}"
            print(f"N = {n}", file=sys.stderr, flush=True)
            row = {"n": n, "build": run_child(args, phase="build", n=n)}
            row["train"] = run_child(args, phase="train", n=n, batch=args.batch, placement="no")
            row["eval"] = run_child(args, phase="eval", n=n)
            if n == min(sizes):
                row["model"] = run_child(args, phase="model", n=n, batch=args.batch)
                row["train_held"] = run_child(args, phase="train", n=n, batch=args.batch, placement="yes")
            rows.append(row)
            if n != min(sizes):
                shutil.rmtree(args.cache_dir, ignore_errors=True)
        args.cache_dir = work / f"cache-{min(sizes)}"
        arms = [(TINY, args.batch, args.steps)]
        if args.ratio_model != "none":
            arms.append((args.ratio_model, args.ratio_batch, args.ratio_steps))
        for model, batch, steps in arms:
            # arms alternated, --repeats each, best of each taken: a shared machine's load comes and goes
            runs = {"yes": [], "no": []}
            for _ in range(args.repeats):
                for p in ("yes", "no"):
                    runs[p].append(run_child(args, phase="train", n=min(sizes), model=model, batch=batch, steps=steps,
                                             placement=p)["images_per_s"])
            held, streamed = max(runs["yes"]), max(runs["no"])
            ratios[model] = {"batch": batch, "steps": steps, "held_images_per_s": held,
                             "streamed_images_per_s": streamed, "ratio": streamed / held, "runs": runs}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(args, rows, ratios)


def report(args, rows, ratios) -> None:
    import torch

    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, torch "
          f"{torch.__version__}, {args.workers} decoding workers, load average {os.getloadavg()[0]:.1f}\n")
    print("| N (train split) | build s | build peak RSS MB (parent / worker) | train s | train img/s | train peak RSS MB "
          "| eval s | eval img/s | eval peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, t, e = r["build"], r["train"], r["eval"]
        print(f"| {r['n']} ({b['examples']}) | {b['wall_s']:.1f} | {b['peak_rss_mb']:.0f} / "
              f"{b['workers_peak_rss_mb']:.0f} | {t['wall_s']:.1f} | {t['images_per_s']:.1f} | {t['peak_rss_mb']:.0f} "
              f"| {e['wall_s']:.1f} | {e['images_per_s']:.0f} | {e['peak_rss_mb']:.0f} |")
    first, last = rows[0], rows[-1]
    growth = {k: last[k]["peak_rss_mb"] / first[k]["peak_rss_mb"] - 1 for k in ("build", "train", "eval")}
    print(f"\npeak RSS growth from N = {first['n']} to {last['n']}: " +
          ", ".join(f"{k} {100 * v:+.1f}%" for k, v in growth.items()))
    if "model" in first:
        print(f"the model's own peak RSS ({TINY}, {args.steps} steps at batch {args.batch}, no data path): "
              f"{first['model']['peak_rss_mb']:.0f} MB; the old held path at N = {first['n']}: train peak RSS "
              f"{first['train_held']['peak_rss_mb']:.0f} MB")
    for model, r in ratios.items():
        print(f"streamed / held training images/s ({model}, batch {r['batch']}, {r['steps']} steps, N = {first['n']}, best of "
              f"{len(r['runs']['no'])}): {r['streamed_images_per_s']:.1f} / {r['held_images_per_s']:.1f} = "
              f"{r['ratio']:.3f} (runs: held {', '.join(f'{v:.1f}' for v in r['runs']['yes'])}; streamed "
              f"{', '.join(f'{v:.1f}' for v in r['runs']['no'])})")
    doc = {"rows": rows, "ratios": ratios, "growth": growth, "steps": args.steps, "batch": args.batch,
           "workers": args.workers, "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
           "loadavg": os.getloadavg()}
    print(json.dumps(doc))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
