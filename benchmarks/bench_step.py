"""The training step with the OrthoReg penalty inside it: eager vs torch.compile, and the penalty's share of each.

    python benchmarks/bench_step.py                                # CPU: ViT-B-32, batch 8, inductor (~10 min on 2 cores)
    python benchmarks/bench_step.py --model tvtool-mini --batch 32 --backend aot_eager   # seconds
    python benchmarks/bench_step.py --device cuda --batch 128 --mode reduce-overhead

Times ``tvtool.train.TrainStep`` forward + backward (the classifier's cross-entropy and the exact squared penalty
over the visual linear layers, full fine-tuning; no optimizer) in four variants - eager / compiled, each without and
with the penalty - interleaved over ``--rounds`` rounds (median per variant), so a shared machine's load moves all
four alike. Reports each variant's time, the penalty's share of the eager and of the compiled step
(``with / without - 1``), the compiled step's speed-up, and the penalty alone (forward + backward) with its
hand-derived gradient (tvtool's custom op: 2 batched products) against autograd through the same formula (3).
Random weights moved off theta_0 (so the penalty's gradient is not zero), random images. fp32 on the CPU, bf16
autocast on CUDA. Compile time is reported, not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autograd_penalty(reg) -> torch.Tensor:
    """The exact squared penalty written plainly (autograd derives the backward: 3 batched products)."""
    total = 0.0
    for i, g in enumerate(reg.groups):
        dw = reg._stacked(i, g, None)
        a = dw.transpose(1, 2) if g.wide else dw
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        m = torch.baddbmm(-eye, a.transpose(1, 2), a)
        total = total + (m.square().sum(dim=(1, 2)) + float(g.n - g.k)).sum()
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    ap.add_argument("--mode", default="default", help="torch.compile mode (inductor only)")
    ap.add_argument("--lam", type=float, default=1.0)
    args = ap.parse_args(argv)

    from tvtool import heads, models, variants
    from tvtool.orthoreg import OrthoReg
    from tvtool.train import CUDA_GRAPH_MODES, TrainStep

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    bundle = models.load_clip(args.model, "random", device=args.device)
    tuned = variants.prepare(bundle.model, "full")
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(1e-3 * torch.randn_like(p))
    reg = OrthoReg.from_tuned(tuned)
    clf = heads.ImageClassifier(tuned.module, torch.randn(10, bundle.model.visual.output_dim, device=device))
    steps = {"plain": TrainStep(clf, None, cuda).to(device).train(), "penalty": TrainStep(clf, reg, cuda).train()}
    params = tuned.trainable_parameters()
    x = torch.randn(args.batch, 3, bundle.image_size, bundle.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    options = {"backend": args.backend} if args.backend != "inductor" else {"mode": args.mode}
    graphs = cuda and args.backend == "inductor" and args.mode in CUDA_GRAPH_MODES

    def runner(step, compiled):
        def run():
            for p in params:
                p.grad = None
            if compiled and graphs:
                torch.compiler.cudagraph_mark_step_begin()
            task, pen = step(x, y)
            (task if pen is None else task + args.lam * pen).backward()
        return run

    variants_ = {}
    compile_s = {}
    for name, step in steps.items():
        variants_[f"eager_{name}"] = runner(step, False)
        compiled = torch.compile(step, dynamic=False, **options)
        fn = runner(compiled, True)
        t = time.perf_counter()
        fn()
        fn()  # the backward compiles at the first call too; a second call settles CUDA graphs' recording
        _sync(device)
        compile_s[name] = time.perf_counter() - t
        variants_[f"compiled_{name}"] = fn

    def penalty_custom_op():
        for p in params:
            p.grad = None
        reg.penalty().backward()

    def penalty_autograd():
        for p in params:
            p.grad = None
        autograd_penalty(reg).backward()

    variants_["penalty_alone_custom_op"] = penalty_custom_op
    variants_["penalty_alone_autograd"] = penalty_autograd
    with torch.no_grad():
        assert abs(float(reg.penalty()) - float(autograd_penalty(reg))) <= 1e-5 * float(reg.penalty())

    times: dict[str, list[float]] = {k: [] for k in variants_}
    for fn in variants_.values():  # warm-up
        fn()
    for r in range(args.rounds):
        order = list(variants_)
        order = order[r % len(order):] + order[:r % len(order)]  # rotate: no variant always runs first
        for k in order:
            _sync(device)
            t = time.perf_counter()
            variants_[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "model": args.model, "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or
                                                                                        platform.machine()),
        "batch": args.batch, "rounds": args.rounds, "backend": args.backend,
        "mode": args.mode if args.backend == "inductor" else None, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "compile_s": compile_s, "median_s": med, "per_round_s": times,
        "penalty_share_eager": med["eager_penalty"] / med["eager_plain"] - 1,
        "penalty_share_compiled": med["compiled_penalty"] / med["compiled_plain"] - 1,
        "compiled_speedup_with_penalty": med["eager_penalty"] / med["compiled_penalty"],
        "compiled_speedup_without_penalty": med["eager_plain"] / med["compiled_plain"],
        "custom_op_speedup_penalty_alone": med["penalty_alone_autograd"] / med["penalty_alone_custom_op"],
    }
    try:
        res["loadavg_1min"] = float(open("/proc/loadavg").read().split()[0])
    except OSError:
        pass
    res["cpu_count"] = os.cpu_count()
    print(f"| {args.model}, batch {args.batch}, {res['device']}, {res['threads']} thread(s), {args.backend} | "
          "median s | |\n|---|---|---|")
    notes = {"eager_penalty": f"penalty {res['penalty_share_eager']:+.1%} of the eager step",
             "compiled_penalty": f"penalty {res['penalty_share_compiled']:+.1%} of the compiled step",
             "penalty_alone_autograd": f"custom op {res['custom_op_speedup_penalty_alone']:.2f}x faster"}
    for k, v in med.items():
        print(f"| {k} | {v:.4f} | {notes.get(k, '')} |")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
