"""OrthoReg cost: step time of full fine-tuning of a ViT-B-32-shaped visual tower with and without the penalty.

    python benchmarks/bench_orthoreg.py                       # CPU, batch 8, 1 thread (< 3 minutes on 2 cores)
    python benchmarks/bench_orthoreg.py --device cuda --batch 128 --steps 10

Random weights (open_clip ViT-B-32, pretrained=None) and random images: timing only. One step = forward (bf16
autocast on CUDA, fp32 on CPU), cross-entropy on a frozen random 10-class head, the penalty (fp32, every step),
backward, clip 1.0, AdamW. Prints a markdown table and a JSON line with:

* step time without / with the exact penalty / with the Hutchinson estimator, and the overhead ratios;
* the penalty alone (forward + backward): batched per shape group vs a Python loop over layers;
* the Hutchinson estimator's relative error of the value and of the gradient (one fixed dW, several probe counts).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps, warmup=True):
    if warmup:  # allocations, kernel selection
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed repetitions per figure (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--dw-std", type=float, default=1e-3, help="std of the random dW the penalty is evaluated at")
    args = ap.parse_args(argv)

    import open_clip

    from tvtool.orthoreg import OrthoReg
    from tvtool.variants import prepare

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = open_clip.create_model(args.model, pretrained=None).to(device)
    tuned = prepare(model, "full")
    with torch.no_grad():  # a realistic, non-zero dW
        for p in tuned.trainable_parameters():
            p.add_(args.dw_std * torch.randn_like(p))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    head = torch.randn(10, model.visual.output_dim, device=device)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-5, weight_decay=0.1)
    regs = {
        "exact": OrthoReg.from_tuned(tuned, lam=1.0),
        "hutchinson": OrthoReg.from_tuned(tuned, lam=1.0, estimator="hutchinson", probes=1),
    }
    loop = OrthoReg.from_tuned(tuned, lam=1.0, batched=False)
    use_bf16 = device.type == "cuda"

    def step(reg=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            feats = tuned.module(x)
            logits = 100 * torch.nn.functional.normalize(feats.float(), dim=-1) @ head.T
            loss = torch.nn.functional.cross_entropy(logits, y)
        if reg is not None:
            loss = loss + reg()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.trainable_parameters(), 1.0)
        opt.step()  # lr 1e-5: dW stays at its chosen scale over the few timed steps
        opt.zero_grad(set_to_none=True)

    def penalty_only(reg):
        def run():
            reg.penalty().backward()
            for p in tuned.trainable_parameters():
                p.grad = None
        return run

    t0 = time.perf_counter()
    res = {"device": str(device), "batch": args.batch, "threads": args.threads, "model": args.model,
           "layers": len(regs["exact"].names), "groups": len(regs["exact"].groups)}
    res["step_s"] = _time(step, device, args.steps)
    for name, reg in regs.items():
        res[f"step_{name}_s"] = _time(lambda: step(reg), device, args.steps)
        res[f"overhead_{name}"] = res[f"step_{name}_s"] / res["step_s"] - 1
    # the steps above already warmed these kernels up (same shapes)
    res["penalty_grouped_s"] = _time(penalty_only(regs["exact"]), device, args.steps, warmup=False)
    res["penalty_loop_s"] = _time(penalty_only(loop), device, args.steps, warmup=device.type == "cuda")
    res["penalty_hutchinson_s"] = _time(penalty_only(regs["hutchinson"]), device, args.steps, warmup=False)

    # Hutchinson accuracy at this dW: relative error of the value and of the gradient vs the exact ones
    params = tuned.trainable_parameters()
    exact_val = regs["exact"].penalty()
    exact_grad = torch.autograd.grad(exact_val, params, allow_unused=True)
    gnorm = torch.sqrt(sum((g.double() ** 2).sum() for g in exact_grad if g is not None))
    res["hutchinson"] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for probes in (1, 8, 64):
        reg = OrthoReg.from_tuned(tuned, estimator="hutchinson", probes=probes)
        vals, gerrs = [], []
        for _ in range(2):  # mean over 2 draws
            v = reg.penalty(generator=gen)
            g = torch.autograd.grad(v, params, allow_unused=True)
            vals.append(abs(v.item() - exact_val.item()) / exact_val.item())
            diff = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(g, exact_grad) if b is not None)
            gerrs.append((torch.sqrt(diff) / gnorm).item())
        res["hutchinson"][probes] = {"value_rel_err": statistics.mean(vals), "grad_rel_err": statistics.mean(gerrs)}
    res["bench_wall_s"] = time.perf_counter() - t0
    try:  # the machine may be shared: say how busy it was
        res["loadavg_1min"] = float(open("/proc/loadavg").read().split()[0])
    except OSError:
        pass

    print(f"| {args.model} visual, batch {args.batch}, {device}, {args.threads} thread(s), "
          f"{res['layers']} layers in {res['groups']} groups | seconds | overhead |")
    print("|---|---|---|")
    print(f"| step, no penalty | {res['step_s']:.3f} | |")
    for name in regs:
        print(f"| step + {name} penalty | {res[f'step_{name}_s']:.3f} | {100 * res[f'overhead_{name}']:+.1f}% |")
    print(f"| penalty fwd+bwd, grouped (exact) | {res['penalty_grouped_s']:.3f} | |")
    print(f"| penalty fwd+bwd, per-layer loop (exact) | {res['penalty_loop_s']:.3f} | |")
    print(f"| penalty fwd+bwd, Hutchinson 1 probe | {res['penalty_hutchinson_s']:.3f} | |")
    for probes, r in res["hutchinson"].items():
        print(f"| Hutchinson {probes} probe(s): rel. error value / gradient | "
              f"{r['value_rel_err']:.2e} / {r['grad_rel_err']:.2e} | |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
