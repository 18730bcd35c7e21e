"""Training throughput: tvtool's fine-tuning loop vs a reference-style fp32 per-epoch-decoding loop, and the
OrthoReg penalty's overhead, measured in one run on the same model, batch and number of timed steps.

    python benchmarks/bench_train.py                   # CPU defaults: ViT-B-32, batch 16, 1 warm-up + 6 timed steps
                                                       # per arm, 2 loader workers (about 3-4 min on a quiet 2-core box)
    python benchmarks/bench_train.py --device cuda --workers 8   # CUDA defaults: batch 128, 10 warm-up + 30 timed
    python benchmarks/bench_train.py --model tvtool-mini --warmup 1 --steps 3   # smoke test (seconds)

Random weights (``pretrained="random"``, seeded): timing only. The arms, in this order:

1. **baseline** - the reference code's input path and step: N synthetic 256x256 JPEGs written to a temporary
   ImageFolder (outside the timing), a ``torch.utils.data.DataLoader`` (``--workers`` processes, shuffle, a fresh
   iterator per epoch) that decodes them every epoch with torchvision's RandomResizedCrop(S, scale 0.9-1.0, bicubic)
   + ToTensor + Normalize on the CPU, the batch copied to the device, fp32, torch's default (non-fused) AdamW over
   the visual tower, logits = normalize(features) @ a frozen random [C, D] head, cross-entropy, clip_grad_norm 1.0,
   a per-step cosine learning rate.
2. **tvtool** - ``tvtool.train.finetune`` itself (mode ``full``, ``eval=False``): the same JPEGs decoded once through
   ``tvtool.datasets`` (Resize + CenterCrop into the uint8 cache, under a temporary ``$TVTOOL_CACHE``), kept on the
   device, batches gathered by index, ``random_resized_crop`` + normalization on the device, bf16 autocast and fused
   AdamW on CUDA (fp32 on CPU), ``variants.prepare(model, "full")``, ``heads.ImageClassifier`` with the zero-shot
   head of the (random) text tower. The benchmark's JPEG folder is registered in the in-process dataset registry
   as a ``DatasetSpec`` whose class names live in code (the registry otherwise reads them from
   ``tvtool/data/templates/<name>.yaml``); nothing is written into the source tree.
3. **tvtool + OrthoReg** - the same ``finetune`` call with ``lam > 0`` (squared form, scope visual-linear, computed
   every step in fp32): once with the exact penalty, once with the Hutchinson estimator (1 probe).

On a GPU machine pass ``--workers`` (up to its core count) so the baseline's decoding is not starved by the default
of 2. By default just enough JPEGs are written for one epoch of each arm (``--images`` overrides; a smaller set makes
the baseline restart its workers at each epoch, as the reference does, and finetune's last batch of an epoch is
short: images/s counts the images actually used).

Timing: ``time.perf_counter`` after ``torch.cuda.synchronize()`` on CUDA, from the end of the last warm-up step to
the end of the last timed step. For the finetune arms the marks are taken in its ``progress`` callback, with
``log_every = --warmup``; finetune's only host syncs are at its log steps, so on CUDA the timed window also holds a
sync every ``--warmup`` steps (finetune's own default is every 20): use a larger ``--warmup`` to make them rarer.
``stop_after`` ends each finetune call before it writes a task vector. Every arm builds its model afresh from the
same seed; model building, head building, JPEG writing and the one-time decode are outside the timed windows (the
one-time decode is reported separately as ``decode_once_s``).

Prints a markdown table and one JSON line: images/s per arm, tvtool / baseline speed-up, OrthoReg step time /
plain tvtool step time, device, torch version, threads, load average.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BENCH_TASK = "bench-train-jpegs"  # the temporary registry entry's name (never written to disk outside the temp dir)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ data
def write_jpegs(root: Path, n: int, classes: int, size: int = 256, seed: int = 0) -> None:
    """``n`` smooth random RGB JPEGs (quality 90) in ``root/train/class_XX/``: natural-image-like file sizes and
    decode cost (white noise would compress badly and decode slower than photos do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / "train" / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        img.save(root / "train" / f"class_{i % classes:02d}" / f"{i:06d}.jpg", quality=90)


def register_bench_dataset(root: Path, classes: int):
    """Register the JPEG folder as an on-disk dataset of the in-process registry (the real decode + cache path)."""
    from tvtool.datasets import DatasetSpec, register
    from tvtool.datasets.base import image_folder

    names = [f"class_{c:02d}" for c in range(classes)]

    class _Spec(DatasetSpec):  # class names and one template in code instead of a templates YAML file
        classnames = property(lambda self: names)
        templates = property(lambda self: ["a photo of a {c}."])

    def listing(split: str, data_root: Path):
        return image_folder(BENCH_TASK, data_root, data_root / split)[1]

    return register(_Spec(name=BENCH_TASK, listing=listing, epochs=1000))


# ------------------------------------------------------------------------------------------------ baseline
def reference_penalty(visual: torch.nn.Module):
    """The penalty as the reference code computes it, for the baseline arm: theta_0 kept on the CPU and copied to
    the device every step, a Python loop over layers, the plain Frobenius norm of the smaller Gram minus I, over
    every trainable 2-D tensor of the image tower in the reference scope (block linears, proj, positional
    embedding). Returns a function of no argument giving the unscaled penalty."""
    from tvtool.orthoreg import select_names

    params = {"visual." + k: p for k, p in visual.named_parameters()}
    names = select_names({k: p.shape for k, p in params.items()}, lambda k: params[k].requires_grad, "reference")
    theta0 = {k: params[k].detach().to("cpu", copy=True) for k in names}

    def penalty() -> torch.Tensor:
        total = 0.0
        for k in names:
            dw = params[k].float() - theta0[k].to(params[k].device)
            gram = dw @ dw.T if dw.shape[0] < dw.shape[1] else dw.T @ dw
            total = total + torch.linalg.norm(gram - torch.eye(gram.shape[0], device=gram.device))
        return total

    return penalty


def run_baseline(args, root: Path, device: str, classes: int, lam: float = 0.0) -> dict:
    """The reference-style loop (see the module docstring); returns seconds and images of the timed window.

    ``lam > 0`` adds the reference code's penalty (:func:`reference_penalty`) every step."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from tvtool import models

    torch.manual_seed(args.seed)
    bundle = models.load_clip(args.model, "random", device=device)
    model, size = bundle.model, bundle.image_size
    model.requires_grad_(False)
    visual = model.visual.requires_grad_(True)
    model.train()
    params = [p for p in visual.parameters() if p.requires_grad]
    # a zero-shot-like head: unit rows times the model's logit scale, as the reference's classification head
    head = F.normalize(torch.randn(classes, model.visual.output_dim, device=device), dim=-1)
    head = head * model.logit_scale.detach().exp()

    transform = T.Compose([
        T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),  # ImageFolder's loader already converts to RGB
        T.Normalize(bundle.mean, bundle.std),
    ])
    data = ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1)  # torch's default implementation: not fused
    penalty = reference_penalty(visual) if lam > 0 else None
    total = args.warmup + args.steps

    batches = iter(loader)
    t0, seen = None, 0
    final_loss = torch.zeros(())
    for step in range(total):
        if step == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:  # a new epoch: a new iterator (workers restart), as the reference's epoch loop does
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device), y.to(device)
        seen += x.shape[0] if step >= args.warmup else 0
        lr = 0.5 * (1 + math.cos(math.pi * step / total)) * args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        feats = visual(x)
        logits = F.normalize(feats, dim=-1) @ head.T
        loss = F.cross_entropy(logits, y)
        if penalty is not None:
            loss = loss + lam * penalty()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        final_loss = loss.detach()
    _sync(device)
    seconds = time.perf_counter() - t0
    del batches, loader
    return {"seconds": seconds, "images": seen, "last_loss": float(final_loss)}


# ------------------------------------------------------------------------------------------------ tvtool
def run_finetune(args, root: Path, device: str, out_dir: Path, n_train: int, **orthoreg) -> dict:
    """One ``tvtool.train.finetune`` call, timed between its log at step ``warmup`` and its last step."""
    from tvtool.train import TrainConfig, finetune

    total = args.warmup + args.steps
    cfg = TrainConfig(task=BENCH_TASK, model=args.model, pretrained="random", mode="full", lr=args.lr,
                      batch_size=args.batch, epochs=1000, max_steps=total, seed=args.seed, data_root=str(root),
                      device=device, eval=False, log_every=args.warmup, **orthoreg)
    marks: dict[int, float] = {}
    last: dict = {}
    records: list[dict] = []

    def progress(record: dict) -> None:
        _sync(device)  # finetune already synced (it read the loss); kept so the mark never precedes device work
        marks[record["step"]] = time.perf_counter()
        last.update(record)
        records.append(dict(record))

    finetune(cfg, out_dir / "never-written.safetensors", progress=progress, stop_after=total)
    # finetune's step s takes perm[(s % steps_per_epoch) * batch:][:batch]: the last batch of an epoch is short
    spe = math.ceil(n_train / args.batch)
    images = sum(min(args.batch, n_train - (s % spe) * args.batch) for s in range(args.warmup, total))
    return {"seconds": marks[total] - marks[args.warmup], "images": images,
            "last_loss": last.get("task_loss"), "penalty": last.get("penalty"),  # finetune's: mean since last log
            "records": records}


# ------------------------------------------------------------------------------------------------ main
def _images_for_one_epoch(needed: int, classes: int) -> int:
    """Fewest JPEGs whose protocol train split (minus the held-out Val part) holds ``needed`` images, so neither
    arm starts a second epoch inside the run (the conservative choice for the baseline: no worker restarts)."""
    from tvtool.datasets import protocol_val_split

    n = max(needed, 2 * classes)
    while len(protocol_val_split(n)[0]) < needed:
        n += 1
    return n


def _image_size(model_name: str) -> int:
    import open_clip

    from tvtool import models

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:  # not a built-in config (e.g. tvtool-mini before registration): build it once
        return models.load_clip(model_name, "random", device="cpu").image_size
    size = cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (or tvtool-mini)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 128 (the protocol's) on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per arm (default: 6 CPU, 30 CUDA)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per arm before the timed ones, >= 1 (default: 1 CPU, 10 CUDA)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    ap.add_argument("--images", type=int, default=0,
                    help="synthetic JPEGs to write (default: enough for one baseline epoch of warm-up + timed steps)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--lam", type=float, default=10.0, help="OrthoReg lambda (any value > 0 costs the same)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated arms to skip: baseline,tvtool,exact,hutchinson")
    args = ap.parse_args(argv)

    import torchvision

    from tvtool import models

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or models.default_device()
    cuda = device.startswith("cuda")
    for name, cpu_default, cuda_default in (("batch", 16, 128), ("steps", 6, 30), ("warmup", 1, 10)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if cuda else cpu_default)
    if args.warmup < 1 or args.steps < 1 or args.batch < 1:
        ap.error("--warmup, --steps and --batch must be >= 1")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    n_images = args.images or _images_for_one_epoch((args.warmup + args.steps) * args.batch, args.classes)
    res: dict = {
        "model": args.model, "device": device, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
        "workers": args.workers, "images_on_disk": n_images, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(torch.device(device))

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tvtool-bench-train-") as tmp:
        tmp = Path(tmp)
        os.environ["TVTOOL_CACHE"] = str(tmp / "cache")  # dataset + head caches: never the user's
        root, out_dir = tmp / "data", tmp / "out"
        out_dir.mkdir()
        t = time.perf_counter()
        write_jpegs(root, n_images, args.classes, seed=args.seed)
        res["write_jpegs_s"] = time.perf_counter() - t

        from tvtool import datasets

        register_bench_dataset(root, args.classes)
        size = _image_size(args.model)
        t = time.perf_counter()
        # the one-time decode into the uint8 cache; finetune then reads the cache
        n_train = len(datasets.load_split(BENCH_TASK, "train", str(root), size)[1])
        res["decode_once_s"] = time.perf_counter() - t

        arms = {
            "baseline": lambda: run_baseline(args, root, device, args.classes),
            "tvtool": lambda: run_finetune(args, root, device, out_dir, n_train),
            "exact": lambda: run_finetune(args, root, device, out_dir, n_train, lam=args.lam),
            "hutchinson": lambda: run_finetune(args, root, device, out_dir, n_train, lam=args.lam,
                                               orthoreg_estimator="hutchinson", orthoreg_probes=1),
        }
        runs = {}
        for name, fn in arms.items():
            if name in skip:
                continue
            r = fn()
            r["images_per_s"] = r["images"] / r["seconds"]
            r["step_s"] = r["seconds"] / args.steps
            runs[name] = r
            print(f"# {name}: {r['images_per_s']:.2f} images/s ({r['step_s']:.3f} s/step)", flush=True)
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    res["arms"] = runs
    for name, r in runs.items():
        res[f"{name}_images_per_s"] = r["images_per_s"]
    if "baseline" in runs and "tvtool" in runs:
        res["speedup_tvtool_vs_baseline"] = runs["tvtool"]["images_per_s"] / runs["baseline"]["images_per_s"]
    for name in ("exact", "hutchinson"):
        if name in runs and "tvtool" in runs:
            res[f"orthoreg_{name}_step_ratio"] = runs[name]["step_s"] / runs["tvtool"]["step_s"]
    res["bench_wall_s"] = time.perf_counter() - t_all
    try:  # the machine may be shared: say how busy it was
        res["loadavg_1min"] = float(open("/proc/loadavg").read().split()[0])
    except OSError:
        pass

    where = res.get("gpu", device)
    print(f"\n| {args.model}, full fine-tuning, batch {args.batch}, {where}, {res['threads']} thread(s), "
          f"{args.steps} timed steps | images/s | s/step | vs |")
    print("|---|---|---|---|")
    labels = {
        "baseline": f"baseline: JPEG DataLoader ({args.workers} workers) + fp32 + AdamW",
        "tvtool": "tvtool finetune" + (" (bf16, fused AdamW)" if device.startswith("cuda") else " (fp32)"),
        "exact": "tvtool + OrthoReg exact",
        "hutchinson": "tvtool + OrthoReg Hutchinson (1 probe)",
    }
    for name, r in runs.items():
        if name == "tvtool" and "speedup_tvtool_vs_baseline" in res:
            vs = f"{res['speedup_tvtool_vs_baseline']:.2f}x baseline"
        elif f"orthoreg_{name}_step_ratio" in res:
            vs = f"{res[f'orthoreg_{name}_step_ratio']:.2f}x step time"
        else:
            vs = ""
        print(f"| {labels[name]} | {r['images_per_s']:.2f} | {r['step_s']:.3f} | {vs} |")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
