"""Where a fine-tuning step's time goes on the GPU: each part of finetune's step timed alone, plus a profiler view.

    python benchmarks/gpu_profile.py --out DIR        # ViT-B-32, batch 128 (the protocol's), on CUDA; ~3 min

The parts are the ones ``tvtool.train.finetune`` runs every step, rebuilt here so each can be timed alone with CUDA
events (median of ``--iters`` after warm-up): the device-side data path (index, RandomResizedCrop, normalize), the
forward + backward of the classifier under bf16 autocast (eager, and wrapped in ``torch.compile``), the exact
OrthoReg penalty's forward + backward (fp32, and with TF32 matmuls), gradient clipping + fused AdamW. The forward +
backward is also timed at larger batches (how MFU grows with the work per launch), and profiled once: the sum of
the GPU kernels' time against the wall time says whether a step waits on the GPU or on Python launching kernels.
Writes ``DIR/profile.json`` and prints a table. Random weights and random images: timing only.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_suite  # noqa: E402


def cuda_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, timed with CUDA events after ``warmup`` runs (a host
    clock without CUDA: the --smoke run)."""
    for _ in range(warmup):
        fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def loop_profile(args, dev: str, res: dict, save) -> None:
    """The real ``tvtool.train.finetune`` loop (JPEG folder decoded into its cache, no penalty) under the profiler
    for ``--loop-steps`` steps after 10: wall time per step, GPU kernel time per step, and the host-side operators
    that take the most CPU time (what the parts above do not show)."""
    import tempfile

    import bench_train
    from torch.profiler import ProfilerActivity, profile, schedule

    from tvtool.train import TrainConfig, finetune

    wait, active = 10, args.loop_steps
    root = Path(tempfile.mkdtemp(prefix="tvtool-gpu-profile-")) / "jpegs"
    n = bench_train._images_for_one_epoch((wait + active + 2) * args.batch, 10)
    bench_train.write_jpegs(root, n, 10)
    bench_train.register_bench_dataset(root, 10)
    for label, extra in (("loop", {}), ("loop_compile", {"compile": True})):
        if extra and args.no_compile:
            continue
        cfg = TrainConfig(task=bench_train.BENCH_TASK, model=args.model, pretrained="random", mode="full",
                          lr=1e-5, batch_size=args.batch, epochs=1000, max_steps=wait + active + 1, data_root=str(root),
                          device=dev, eval=False, log_every=10_000, **extra)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else []),
                     schedule=schedule(wait=wait, warmup=0, active=active, repeat=1)) as prof:
            # finetune calls progress only at log steps; a per-step hook is its optimizer's step_post hook
            import torch.optim.optimizer as optmod
            handle = optmod.register_optimizer_step_post_hook(lambda *a, _p=prof: _p.step())
            try:
                t = time.perf_counter()
                finetune(cfg, root.parent / "never.safetensors", stop_after=wait + active + 1)
                res.setdefault("loop_total_s", {})[label] = time.perf_counter() - t
            finally:
                handle.remove()
        events = prof.key_averages()
        cuda = [e for e in events if e.device_type.name == "CUDA"]
        cpu = [e for e in events if e.device_type.name == "CPU"]
        kernel_ms = sum(e.self_device_time_total for e in cuda) / active / 1e3
        step_ms = max((e.cpu_time_total for e in cpu if e.key.startswith("ProfilerStep")), default=0) / active / 1e3
        res[f"profile_{label}"] = {
            "gpu_kernel_ms_per_step": kernel_ms,
            "host_ms_per_step_profiled": step_ms,
            "top_cpu_ops": [{"name": e.key[:90], "self_cpu_ms_per_step": e.self_cpu_time_total / active / 1e3,
                             "calls_per_step": e.count / active}
                            for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:20]],
            "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / active / 1e3,
                             "calls_per_step": e.count / active}
                            for e in sorted(cuda, key=lambda e: -e.self_device_time_total)[:10]]}
        p = res[f"profile_{label}"]
        print(f"# finetune {label} under the profiler: GPU kernels {kernel_ms:.2f} ms/step", flush=True)
        for k in p["top_cpu_ops"]:
            print(f"#  cpu {k['self_cpu_ms_per_step']:7.3f} ms x{k['calls_per_step']:<6.1f} {k['name']}", flush=True)
        for k in p["top_kernels"]:
            print(f"#  gpu {k['ms_per_step']:7.3f} ms x{k['calls_per_step']:<6.1f} {k['name']}", flush=True)
        save()


def loop_speed(args, dev: str, res: dict, save) -> None:
    """Images/s of the real finetune loop (no profiler) per ``--loop-variants`` entry: eager, or a torch.compile
    mode; ``+penalty`` adds the exact OrthoReg penalty (lambda 10), ``+tf32`` its TF32 form. Timed like the GPU
    suite: between finetune's log at step 10 and its log at step 10 + --loop-timed."""
    import tempfile
    from types import SimpleNamespace

    import bench_train

    root = Path(tempfile.mkdtemp(prefix="tvtool-gpu-loop-")) / "jpegs"
    warm, timed = 10, args.loop_timed
    n = bench_train._images_for_one_epoch((warm + timed) * args.batch, 10)
    bench_train.write_jpegs(root, n, 10)
    bench_train.register_bench_dataset(root, 10)
    ns = SimpleNamespace(model=args.model, lr=1e-5, batch=args.batch, seed=0, warmup=warm, steps=timed)
    for variant in args.loop_variants.split(","):
        base, *extras = variant.split("+")
        kwargs = {} if base == "eager" else {"compile": True, "compile_mode": base}
        if "penalty" in extras:
            kwargs["lam"] = 10.0
        if "tf32" in extras:
            kwargs["orthoreg_precision"] = "tf32"
        try:
            t = time.perf_counter()
            r = bench_train.run_finetune(ns, root, dev, root.parent, n, **kwargs)
            res.setdefault("loop_images_per_s", {})[variant] = r["images"] / r["seconds"]
            res.setdefault("loop_wall_s", {})[variant] = time.perf_counter() - t
            print(f"# loop {variant}: {r['images'] / r['seconds']:.0f} images/s "
                  f"({1e3 * r['seconds'] / timed:.1f} ms/step; call {time.perf_counter() - t:.0f} s)", flush=True)
        except Exception as exc:
            res.setdefault("errors", {})[variant] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"# loop {variant} failed: {res['errors'][variant]}", flush=True)
        save()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--big-batches", default="256,512", help="extra batch sizes for the forward + backward")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--loop-steps", type=int, default=10, help="profiled steps of the real finetune loop")
    ap.add_argument("--loop-timed", type=int, default=30, help="timed steps per --loop-variants run")
    ap.add_argument("--loop-variants", default="", help="e.g. eager,default,reduce-overhead,eager+penalty: "
                    "images/s of the real loop per torch.compile mode (+penalty, +tf32)")
    ap.add_argument("--only-loops", action="store_true", help="skip the part timings and profiles")
    ap.add_argument("--only-penalty", action="store_true", help="stop after the penalty's timings and TF32 error")
    ap.add_argument("--out", default="gpu-profile")
    ap.add_argument("--smoke", action="store_true", help="tvtool-mini on the CPU, batch 8, no compile (the test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.iters, args.big_batches, args.no_compile = "tvtool-mini", 8, 2, "16", True
        args.loop_steps = 2
    elif not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs CUDA (or --smoke)")
    from tvtool import heads, models, variants
    from tvtool.orthoreg import OrthoReg
    from tvtool.train import crop_boxes, resized_crop

    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    res: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "model": args.model, "batch": args.batch,
                 "torch": torch.__version__, "ms": {}}
    torch.manual_seed(0)
    bundle = models.load_clip(args.model, "random", device=dev)
    size = bundle.image_size
    tuned = variants.prepare(bundle.model, "full")
    head = torch.randn(10, bundle.model.visual.output_dim, device=dev)
    clf = heads.ImageClassifier(tuned.module, head).to(dev).train()
    params = [p for _, p in tuned.named_trainable()]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
    reg = OrthoReg.from_tuned(tuned)
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))  # a non-zero dW: the penalty's gradient is exactly 0 at theta_0
    flops = gpu_suite.flops_per_image(args.model, dev, 8)
    peak = gpu_suite.bf16_peak(res["device"])
    res["flops_per_image"] = flops

    images = torch.randint(0, 256, (1024, 3, size, size), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (1024,), device=dev)
    mean = torch.tensor(bundle.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=dev).view(1, 3, 1, 1)
    gen = torch.Generator(device=dev).manual_seed(0)

    def batch(n):
        idx = torch.randint(0, 1024, (n,), device=dev)
        x = images.index_select(0, idx).float().div_(255)
        x = resized_crop(x, crop_boxes(n, size, size, gen, dev), size)
        return (x - mean) / std, labels.index_select(0, idx)

    x, y = batch(args.batch)

    def fwd_bwd(model, xb=None, yb=None):
        def run():
            with torch.autocast(dev, dtype=torch.bfloat16):
                logits = model(x if xb is None else xb)
            F.cross_entropy(logits.float(), y if yb is None else yb).backward()
        return run

    def penalty():
        reg.penalty().backward()

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def whole_step():
        xb, yb = batch(args.batch)
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits = clf(xb)
        (F.cross_entropy(logits.float(), yb) + 10.0 * reg.penalty()).backward()
        clip_and_step()
        opt.zero_grad(set_to_none=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "profile.json").write_text(json.dumps(res, indent=1))

    class Recorder(dict):  # prints and saves each figure as it is taken: a run cut short keeps what it measured
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            print(f"# {key}: {value:.3f} ms", flush=True)
            save()

    ms = res["ms"] = Recorder()
    if args.loop_variants:
        loop_speed(args, dev, res, save)
    if args.only_loops:
        return res
    it = args.iters
    ms["data"] = cuda_ms(lambda: batch(args.batch), it)
    ms["fwd_bwd_eager"] = cuda_ms(fwd_bwd(clf), it)
    ms["penalty_fwd_bwd"] = cuda_ms(penalty, it)
    def penalty_grads() -> torch.Tensor:
        for p in params:
            p.grad = None
        reg.penalty().backward()
        return torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])

    fp32_grad = penalty_grads()
    reg.precision = "tf32"  # --orthoreg-precision tf32: both products of the exact penalty in TF32
    try:
        ms["penalty_fwd_bwd_tf32"] = cuda_ms(penalty, it)
        tf32_grad = penalty_grads()
    finally:
        reg.precision = "fp32"
    # the gradient, not the value: the value is dominated by the constant identity term (sum of n_l)
    res["penalty_tf32_grad_rel_error"] = float((tf32_grad - fp32_grad).norm() / fp32_grad.norm())
    print(f"# penalty gradient, TF32 vs fp32: {res['penalty_tf32_grad_rel_error']:.2e} relative", flush=True)
    opt.zero_grad(set_to_none=True)
    if args.only_penalty:
        save()
        return res
    ms["clip_and_adamw"] = cuda_ms(clip_and_step, it)
    ms["whole_step_eager"] = cuda_ms(whole_step, it)

    # GPU-busy fraction: kernel time summed by the profiler over wall time, for the forward + backward and the step
    from torch.profiler import ProfilerActivity, profile
    for label, run in (("fwd_bwd", fwd_bwd(clf)), ("whole_step", whole_step)):
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(5):
                run()
            sync()
            wall = (time.perf_counter() - t) / 5 * 1e3
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        kernel_ms = sum(e.self_device_time_total for e in events) / 5 / 1e3
        res[f"profile_{label}"] = {"wall_ms_per_iter": wall, "gpu_kernel_ms_per_iter": kernel_ms,
                                   "gpu_busy_fraction": kernel_ms / wall,
                                   "kernels_per_iter": sum(e.count for e in events) / 5,
                                   "top_kernels": [{"name": e.key[:110], "ms_per_iter": e.self_device_time_total / 5e3,
                                                    "calls_per_iter": e.count / 5}
                                                   for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]]}
        p = res[f"profile_{label}"]
        print(f"# {label} under the profiler: wall {p['wall_ms_per_iter']:.2f} ms, GPU kernels "
              f"{p['gpu_kernel_ms_per_iter']:.2f} ms (busy {100 * p['gpu_busy_fraction']:.0f}%), "
              f"{p['kernels_per_iter']:.0f} kernels", flush=True)
        for k in p["top_kernels"]:
            print(f"#  {k['ms_per_iter']:7.3f} ms  x{k['calls_per_iter']:<5.0f} {k['name']}", flush=True)
        save()
        opt.zero_grad(set_to_none=True)

    for b in [int(v) for v in args.big_batches.split(",") if v]:
        xb, yb = batch(b)
        ms[f"fwd_bwd_eager_b{b}"] = cuda_ms(fwd_bwd(clf, xb, yb), max(5, it // 2))
        del xb, yb
    if not args.no_compile:
        # not reduce-overhead: these timings accumulate gradients over calls, which CUDA graphs cannot do
        # (pytorch#169545); the real loop's --loop-variants time it with fresh gradients every step
        for mode in ("default",):
            try:
                t = time.perf_counter()
                compiled = torch.compile(clf, mode=None if mode == "default" else mode)
                inner = fwd_bwd(compiled)

                def fn():
                    if mode == "reduce-overhead":  # CUDA graphs: each call is a new step
                        torch.compiler.cudagraph_mark_step_begin()
                    inner()
                fn()
                sync()
                res.setdefault("compile_s", {})[mode] = time.perf_counter() - t
                ms[f"fwd_bwd_compiled_{mode}"] = cuda_ms(fn, it)
            except Exception as exc:  # one mode failing must not lose the others' figures
                res.setdefault("errors", {})[mode] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"# compile {mode} failed: {res['errors'][mode]}", flush=True)
            opt.zero_grad(set_to_none=True)

    mfu = {}
    for k, v in ms.items():
        if k.startswith("fwd_bwd"):
            m = re.search(r"_b(\d+)$", k)
            b = int(m.group(1)) if m else args.batch
            mfu[k] = b * flops / (v / 1e3) / peak if peak else None
    res["mfu"] = mfu
    loop_profile(args, dev, res, save)
    save()
    print(f"| {args.model}, batch {args.batch}, {res['device']} | ms | MFU |")
    print("|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} | {'' if mfu.get(k) is None else f'{100 * mfu[k]:.1f}%'} |")
    return res


if __name__ == "__main__":
    main()
