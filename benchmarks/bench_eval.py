"""Time of a 21-point task-addition alpha search: the Evaluator (built once, weights updated in place) against
re-building everything per grid point (fresh load_clip + zero-shot heads + inputs + theta_0 + alpha * sum(tau)).

    python benchmarks/bench_eval.py                       # tvtool-mini, 2 mini tasks, Val splits, CPU
    python benchmarks/bench_eval.py --tasks mini-shapes,mini-colors,mini-glyphs --threads 2
    python benchmarks/bench_eval.py --model ViT-B-32 --max-examples 32   # a real-size tower, mini data at 224
    python benchmarks/bench_eval.py --linearized          # tangent model: point by point vs Evaluator.sweep

The base model is a randomly initialised architecture saved once to a temporary safetensors file (so every
re-build loads the same weights from disk, like a real checkpoint); the task vectors are random (their accuracies
do not matter for timing) and carry metrics so no fine-tuned accuracy is computed. Both paths evaluate the same
(task, Val) inputs, batched identically, and must give identical accuracies: the script checks that. Datasets are
decoded into the uint8 cache before timing starts, so the re-build path pays a cache read, not JPEG/generation.

With --linearized both paths are the Evaluator on the tangent model (the model linear-mode vectors are evaluated
on): one jvp pass per grid point against ``Evaluator.sweep``, whose features f0 + alpha * J tau serve the whole grid
from one jvp per batch. Both must give identical accuracies.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tvtool-mini")
    ap.add_argument("--tasks", default="mini-shapes,mini-colors")
    ap.add_argument("--grid", default="0:1:0.05")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--max-examples", type=int, default=None, help="first N Val examples per task (big models)")
    ap.add_argument("--linearized", action="store_true",
                    help="tangent model: a jvp pass per point against Evaluator.sweep (one pass for the grid)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import save_file

    from tvtool import datasets, evaluate as ev
    from tvtool.heads import ImageClassifier, zero_shot_head
    from tvtool.models import load_clip
    from tvtool.taskvector import new_meta, open_vector, write_vector

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    grid = ev.parse_grid(args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        bundle = load_clip(args.model, "random", device="cpu")
        weights = tmp / "base.safetensors"
        save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(weights))
        bundle = load_clip(args.model, str(weights), device="cpu")
        g = torch.Generator().manual_seed(1)
        paths = []
        for t in tasks:
            tau = {"visual." + k: 0.01 * torch.randn(p.shape, generator=g)
                   for k, p in bundle.model.visual.named_parameters()}
            meta = new_meta({"model": args.model, "pretrained": str(weights), "fingerprint": bundle.fingerprint},
                            tasks=[t], mode="full", metrics={"val_acc": 1.0, "test_acc": 1.0})
            write_vector(tmp / f"{t}.st", tau, meta)
            paths.append(tmp / f"{t}.st")
        n_val = {t: datasets.load_split(t, "val", args.data_root, bundle.image_size)[1][:args.max_examples].numel()
                 for t in tasks}
        del bundle
        if args.linearized:
            return tangent_sweep(args, tasks, grid, weights, paths, sum(n_val.values()))

        # ---- the Evaluator: everything alpha-independent built once, one in-place update per point
        t0 = time.perf_counter()
        bundle = load_clip(args.model, str(weights), device=args.device)
        evaluator = ev.Evaluator(bundle, tasks, args.data_root, ("val",), args.device, args.batch_size,
                                 max_examples=args.max_examples)
        vectors = [open_vector(p) for p in paths]
        total = ev.load_deltas(vectors, evaluator.device)
        t_setup = time.perf_counter() - t0
        fast, t_update = [], 0.0
        for a in grid:
            t1 = time.perf_counter()
            evaluator.set_weights(total, a)
            t_update += time.perf_counter() - t1
            fast.append(evaluator.accuracies(tasks, "val"))
        t_fast = time.perf_counter() - t0

        # ---- re-build per point
        t0 = time.perf_counter()
        slow, t_rebuild = [], 0.0
        for a in grid:
            t1 = time.perf_counter()
            b = load_clip(args.model, str(weights), device=args.device)
            with torch.no_grad():
                params = dict(b.model.visual.named_parameters())
                for p in paths:
                    vec = open_vector(p)
                    for k in vec.keys():
                        params[k[len("visual."):]].add_(vec.get(k).to(args.device, torch.float32), alpha=a)
            acc, data = {}, {}
            for t in tasks:
                head = zero_shot_head(b, datasets.get_dataset(t), cache=False)
                x, y = datasets.load_split(t, "val", args.data_root, b.image_size)
                data[t] = (head, x[:args.max_examples].to(args.device), y[:args.max_examples].to(args.device))
            std = torch.tensor(b.std, device=args.device).view(1, -1, 1, 1)
            mean = torch.tensor(b.mean, device=args.device).view(1, -1, 1, 1)
            scale, shift = 1.0 / (255.0 * std), -mean / std  # the Evaluator's normalisation, same float ops
            t_rebuild += time.perf_counter() - t1
            for t, (head, x, y) in data.items():
                clf = ImageClassifier(b.model.visual, head).eval()
                correct = torch.zeros((), dtype=torch.long, device=args.device)
                with torch.inference_mode(), torch.autocast(device_type=torch.device(args.device).type,
                                                            dtype=torch.bfloat16,
                                                            enabled=torch.device(args.device).type == "cuda"):
                    for i in range(0, y.numel(), args.batch_size):
                        xb = torch.addcmul(shift, x[i:i + args.batch_size].float(), scale)
                        correct += clf(xb).argmax(-1).eq(y[i:i + args.batch_size]).sum()
                acc[t] = correct.item() / y.numel()
            slow.append(acc)
        t_slow = time.perf_counter() - t0

    same = all(abs(f[t] - s[t]) < 1e-9 for f, s in zip(fast, slow) for t in tasks)
    n_img = sum(n_val.values())
    print(f"model {args.model} on {args.device}, {torch.get_num_threads()} thread(s), tasks {','.join(tasks)} "
          f"(Val: {n_img} images in all), {len(grid)} grid points")
    print(f"evaluator : {t_fast:7.2f} s  (set-up {t_setup:.2f} s, then {(t_fast - t_setup) / len(grid):.3f} s/point)")
    print(f"re-build  : {t_slow:7.2f} s  ({t_slow / len(grid):.3f} s/point)")
    print(f"per-point overhead without the forward passes: in-place update {1000 * t_update / len(grid):.1f} ms, "
          f"re-build (load + heads + inputs + apply) {1000 * t_rebuild / len(grid):.1f} ms "
          f"({t_rebuild / max(t_update, 1e-9):.0f}x)")
    print(f"speed-up  : {t_slow / t_fast:6.2f}x   identical accuracies: {same}")
    if not same:
        raise SystemExit("the two paths disagree: a bug")


def tangent_sweep(args, tasks, grid, weights, paths, n_img) -> None:
    from tvtool import evaluate as ev
    from tvtool.models import load_clip
    from tvtool.taskvector import open_vector

    bundle = load_clip(args.model, str(weights), device=args.device)
    evaluator = ev.Evaluator(bundle, tasks, args.data_root, ("val",), args.device, args.batch_size,
                             max_examples=args.max_examples, linearized=True)
    total = ev.load_deltas([open_vector(p) for p in paths], evaluator.device)
    evaluator.accuracies(tasks, "val")  # heads and inputs built outside both timings
    t0 = time.perf_counter()
    pointwise = []
    for a in grid:
        evaluator.set_weights(total, a)
        pointwise.append(evaluator.accuracies(tasks, "val"))
    t_point = time.perf_counter() - t0
    evaluator.reset()
    t0 = time.perf_counter()
    swept = evaluator.sweep(total, grid, tasks, "val")
    t_sweep = time.perf_counter() - t0
    same = pointwise == swept
    print(f"model {args.model} (tangent) on {args.device}, {torch.get_num_threads()} thread(s), tasks "
          f"{','.join(tasks)} (Val: {n_img} images in all), {len(grid)} grid points")
    print(f"a jvp pass per point : {t_point:7.2f} s  ({t_point / len(grid):.3f} s/point)")
    print(f"Evaluator.sweep      : {t_sweep:7.2f} s")
    print(f"speed-up  : {t_point / t_sweep:6.2f}x   identical accuracies: {same}")
    if not same:
        raise SystemExit("the two paths disagree: a bug")
    if len(tasks) >= 2:  # the disentanglement map of the first two tasks (default 9 x 9 grid, Val split)
        vecs = [open_vector(p) for p in paths[:2]]
        t0 = time.perf_counter()
        fast = ev.disentanglement(evaluator, vecs[0], vecs[1], split="val")
        t_fast = time.perf_counter() - t0
        evaluator.linearized = False  # the same tangent tower, evaluated point by point
        t0 = time.perf_counter()
        slow = ev.disentanglement(evaluator, vecs[0], vecs[1], split="val")
        t_slow = time.perf_counter() - t0
        print(f"disentanglement {tasks[0]} x {tasks[1]}, 9 x 9: point by point {t_slow:.2f} s, tangent passes "
              f"{t_fast:.2f} s, {t_slow / t_fast:.1f}x   identical maps: {fast['error'] == slow['error']}")
        if fast["error"] != slow["error"]:
            raise SystemExit("the two paths disagree: a bug")


if __name__ == "__main__":
    main()
