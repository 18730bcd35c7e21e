"""Every GPU figure of tvtool from ONE command that finishes in under 10 minutes (issues 12 and 25).

    python benchmarks/gpu_suite.py --out DIR                # ViT-B-32, batch 128, on the GPU (< 10 min on an H100)
    python benchmarks/gpu_suite.py --arms train,checks      # a subset in a short GPU window
    python benchmarks/gpu_suite.py --smoke                  # every arm on the CPU with tvtool-mini (a few minutes)

One process, random weights, fabricated data, the same model and batch for every arm. Writes ``DIR/suite.json``
(rewritten after every measurement, so a run cut short still leaves what it measured; arms run in order of
importance and none starts after ``--budget-s``, 540 s by default on a GPU) and prints a markdown table. Any figure
that cannot be taken here is ``null`` with its reason under ``skipped`` (dotted path -> reason), and a measurement
that raises is recorded under ``errors`` without stopping the others.

Arms:

* **train** - images/s of (a) a reference-style loop (``bench_train.run_baseline``: fp32, a JPEG-decoding
  DataLoader with workers, torchvision transforms, plus the reference code's penalty with theta_0 on the CPU,
  ``bench_train.reference_penalty``), (b) the real ``tvtool.train.finetune`` loop (``bench_train.run_finetune`` on
  the same JPEG folder, decoded once into the uint8 cache), (c) the same with ``--compile --compile-mode
  reduce-overhead`` (``--compile-mode``; ``--smoke`` compiles with the aot_eager backend, as inductor's C++ build
  is slow on 2 cores), with (b) and (c) as multiples of (a) from this one run; MFU of (b) and (c) = achieved FLOP/s
  over the device's dense bf16 peak, with FLOPs per image counted by ``torch.utils.flop_counter.FlopCounterMode``
  over one forward + backward of the image tower and head (the penalty not counted); peak device memory of finetune
  without and with the exact penalty; and the images/s of the split streamed from the cache file
  (``--data-on-device no``) over the same split held on the device (issue 22).
* **orthoreg** - finetune's step time with the exact penalty, the Hutchinson one (1 probe) and the exact one with
  ``orthoreg_precision="tf32"``, each as a fraction of the eager step without penalty (``step_with / step_without -
  1``); and ``compiled_exact_overhead``: the exact penalty inside the compiled step (with reduce-overhead: inside
  its CUDA graphs) over the same compiled step without it.
* **checks** - booleans, each a real comparison (tolerances in ``checks_detail``): the compiled training step's
  whole gradient (task loss + lambda * exact penalty) against eager on 3 fresh batches with graph replays
  (finetune's bf16 autocast, tolerance 5e-2; ``_fp32``: without autocast, 1e-3) and the penalty's value (1e-5);
  the fused scaled_dot_product_attention kernel in every block of a training step; compiled vs eager finetune
  losses; the penalty under bf16 autocast vs without; the device-side RandomResizedCrop's crop statistics vs
  torchvision's; bf16 vs fp32 loss curves; and (with 2+ GPUs, or 2 CPU processes with gloo in ``--smoke``)
  finetune under torchrun with DDP and with FSDP2 (penalty, 2 accumulation micro-batches) vs one process.
* **vitl** - the paper's large model: ViT-L-14 at batch 128 as 64 x 2 accumulation micro-batches (eager: CUDA graphs
  cannot accumulate), without and with the exact penalty: images/s, MFU, step time and peak memory overheads of
  OrthoReg (the paper: 158 min and 42.6 GB a run, +12% / +4.5% with OrthoReg, on its own hardware).
* **eval** - a 21-point task-addition alpha search over the Val sets of the 8 mini tasks (synthetic; sizes in the
  JSON) with 8 random task vectors: the Evaluator (built once, weights updated in place) against re-building
  model + heads + inputs per point (timed on ``--rebuild-points`` points, scaled to 21); both must agree.
* **merge** - tsv, iso-c, iso-cts and wudi on 8 random vectors shaped like ViT-B-32's image tower (``bench_merge`` shapes), on the
  GPU and on the CPU: one key of each distinct 2-D shape is timed and multiplied by the number of keys of that
  shape (the other keys fall back to a sum and are timed in full), so the CPU arm stays bounded.

``--smoke`` runs exactly these code paths on the CPU with tvtool-mini, batch 8 and a few steps; the test suite runs
it (tests/test_gpu_suite.py), so the suite cannot rot.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, imported as modules

import bench_merge  # noqa: E402
import bench_train  # noqa: E402

# in order of importance: a run cut short (a device lease ending) keeps the first ones
ARMS = ("train", "orthoreg", "checks", "vitl", "eval", "merge")
GRID_POINTS = 21
MERGE_VECTORS = 8
MERGE_METHODS = ("tsv", "iso-c", "iso-cts", "wudi")  # the per-layer methods, which use the GPU
# dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name (first match)
BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12))


# ------------------------------------------------------------------------------------------------ small pieces
def _sync(device: str) -> None:
    bench_train._sync(device)


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_PEAK:
        if key.lower() in device_name.lower():
            return peak
    return None


def _rel_curve_diff(a: list[float], b: list[float]) -> float:
    """Largest step-wise |a - b| relative to the mean |b| (loss curves of equal length)."""
    if len(a) != len(b) or not a:
        return math.inf
    scale = max(1e-12, statistics.mean(abs(v) for v in b))
    return max(abs(x - y) for x, y in zip(a, b)) / scale


class Suite:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.res: dict = {"device": None, "model": args.model, "batch": args.batch, "smoke": args.smoke,
                          "train": {}, "orthoreg": {}, "vitl": {}, "eval": {}, "merge": {}, "checks": {},
                          "checks_detail": {},
                          "skipped": {}, "arm_seconds": {}, "settings": {}}
        self.runs: dict[str, dict] = {}  # finetune runs by variant, shared by the arms that need them
        self.tmp = Path(tempfile.mkdtemp(prefix="tvtool-gpu-suite-"))
        self.root = self.tmp / "jpegs"
        self.n_train = None
        self.compile_error: str | None = None
        self.t0 = time.perf_counter()

    # ---- output
    def skip(self, path: str, reason: str) -> None:
        self.res["skipped"][path] = reason

    def save(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "suite.json.tmp"
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        tmp.replace(out / "suite.json")

    # ---- shared fixtures
    def jpeg_dataset(self) -> int:
        """The JPEG folder of the train arms (written once), registered for finetune; returns finetune's n_train."""
        if self.n_train is None:
            from tvtool import datasets

            a = self.args
            n = bench_train._images_for_one_epoch((a.warmup + a.steps) * a.batch, a.classes)
            t = time.perf_counter()
            bench_train.write_jpegs(self.root, n, a.classes, seed=a.seed)
            bench_train.register_bench_dataset(self.root, a.classes)
            size = bench_train._image_size(a.model)
            self.n_train = len(datasets.load_split(bench_train.BENCH_TASK, "train", str(self.root), size)[1])
            self.res["settings"].update(jpegs_on_disk=n, jpeg_write_and_decode_once_s=time.perf_counter() - t)
        return self.n_train

    def finetune_run(self, variant: str) -> dict:
        """One timed finetune call (memoised): plain | compile | compile_exact | exact | hutchinson | exact_tf32 on
        the suite's model, vitl_plain | vitl_exact on ``--vitl-model`` with 2-step gradient accumulation."""
        if variant not in self.runs:
            a = self.args
            n_train = self.jpeg_dataset()
            compiled = {"compile": True, "compile_mode": a.compile_mode, "compile_backend": a.compile_backend}
            kwargs = {"exact": {"lam": a.lam}, "exact_tf32": {"lam": a.lam, "orthoreg_precision": "tf32"},
                      "compile": compiled, "compile_exact": {**compiled, "lam": a.lam},
                      "hutchinson": {"lam": a.lam, "orthoreg_estimator": "hutchinson", "orthoreg_probes": 1},
                      "vitl_plain": {"grad_accum": 2}, "vitl_exact": {"grad_accum": 2, "lam": a.lam},
                      "held": {"data_on_device": "yes"}, "streamed": {"data_on_device": "no"},
                      }[variant] if variant != "plain" else {}
            if variant.startswith("vitl"):  # its own model and step counts, the same JPEGs and global batch
                a = SimpleNamespace(**{**vars(a), "model": a.vitl_model, "warmup": a.vitl_warmup,
                                       "steps": a.vitl_steps})
            out = self.tmp / f"ft-{variant}"
            out.mkdir(exist_ok=True)
            gc.collect()  # the previous run's model must not count in this one's peak
            if self.cuda:
                torch.cuda.empty_cache()
            _peak_reset(self.device)
            t = time.perf_counter()
            r = bench_train.run_finetune(a, self.root, self.device, out, n_train, **kwargs)
            r["wall_s"] = time.perf_counter() - t  # includes model build and (compile) compilation
            r["images_per_s"] = r["images"] / r["seconds"]
            r["step_s"] = r["seconds"] / a.steps
            r["peak_memory_gb"] = _peak_gb(self.device)
            self.runs[variant] = r
            self.res.setdefault("finetune_runs", {})[variant] = {k: v for k, v in r.items() if k != "records"}
            self.save()
        return self.runs[variant]

    def compile_run(self, variant: str = "compile") -> dict:
        """A compiled finetune run (compile | compile_exact); a failure is remembered (compile_possible then gives
        it) and re-raised."""
        try:
            return self.finetune_run(variant)
        except Exception as exc:
            self.compile_error = f"torch.compile failed: {type(exc).__name__}: {exc}"
            raise

    def compile_possible(self) -> str | None:
        """Why torch.compile cannot run here (None when it can)."""
        if self.compile_error:
            return self.compile_error
        if self.args.no_compile:
            return "--no-compile given"
        if not self.cuda and self.args.compile_backend == "inductor":
            import shutil

            if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("cc") is None:
                return "torch.compile (inductor) on the CPU needs a C++ compiler and none is on PATH"
        return None

    # ---- arms
    def over_budget(self, path: str) -> bool:
        """True (and ``path`` skipped with the reason) once the run has used ``--budget-s``: what is left is not
        started, so the JSON is complete before a device lease runs out."""
        spent = time.perf_counter() - self.t0
        if self.args.budget_s and spent > self.args.budget_s:
            self.skip(path, f"not started: {spent:.0f} s spent of the --budget-s {self.args.budget_s:.0f} s")
            self.save()
            return True
        return False

    def guarded(self, path: str, fn):
        """``fn()``, or None with its error recorded under ``errors[path]`` and ``skipped[path]``: one failed
        measurement must not cost the rest of its arm. The JSON is saved either way."""
        try:
            return fn()
        except Exception as exc:
            self.res.setdefault("errors", {})[path] = f"{type(exc).__name__}: {exc}"
            self.skip(path, "the measurement raised (see errors)")
            return None
        finally:
            self.save()

    def mfu(self, path: str, flops_per_image: float, images_per_s: float | None) -> float | None:
        peak = bf16_peak(self.res["device"]) if self.cuda else None
        if peak is None or images_per_s is None:
            self.skip(path, "no images/s measured" if images_per_s is None else
                      f"no dense bf16 peak known for device {self.res['device']!r} (add it to BF16_PEAK)")
            return None
        return flops_per_image * images_per_s / peak

    def arm_train(self) -> None:
        a, tr = self.args, self.res["train"]
        self.jpeg_dataset()

        def reference():
            r = bench_train.run_baseline(a, self.root, self.device, a.classes, lam=a.lam)
            tr.update(reference_workers=a.workers, reference_penalty_lambda=a.lam)
            return r["images"] / r["seconds"]

        tr["reference_images_per_s"] = self.guarded("train.reference_images_per_s", reference)
        plain = self.finetune_run("plain")
        tr["tvtool_images_per_s"] = plain["images_per_s"]
        why = self.compile_possible()
        tr["tvtool_compile_images_per_s"] = None
        if why is None:
            try:
                tr["tvtool_compile_images_per_s"] = self.compile_run()["images_per_s"]
            except Exception:  # the rest of the arm still runs
                self.skip("train.tvtool_compile_images_per_s", self.compile_error)
                self.res.setdefault("errors", {})["train.compile"] = self.compile_error
            tr["compile_backend"] = a.compile_backend
            tr["compile_mode"] = a.compile_mode if a.compile_backend == "inductor" else None
            if a.compile_backend != "inductor":
                tr["compile_note"] = ("--smoke compiles with aot_eager (graph capture + AOTAutograd, no code "
                                      "generation): inductor's C++ build of even the tiny model takes about a minute "
                                      "on a 2-core CPU; pass --compile-backend inductor to run it")
        else:
            self.skip("train.tvtool_compile_images_per_s", why)
        ref = tr["reference_images_per_s"]
        for key, value in (("speedup_vs_reference", tr["tvtool_images_per_s"]),
                           ("speedup_compile_vs_reference", tr["tvtool_compile_images_per_s"])):
            tr[key] = value / ref if value and ref else None  # both from this one run
        exact = self.finetune_run("exact")
        tr["tvtool_penalty_images_per_s"] = exact["images_per_s"]
        tr["flops_per_image"] = flops_per_image(a.model, self.device, min(a.batch, 8))
        tr["flops_counted_by"] = ("torch.utils.flop_counter.FlopCounterMode: one forward + backward of the image "
                                  "tower + head, fp32, divided by the batch; the penalty and optimizer not counted")
        tr["bf16_peak_flops"] = bf16_peak(self.res["device"]) if self.cuda else None
        tr["mfu"] = self.mfu("train.mfu", tr["flops_per_image"], tr["tvtool_images_per_s"])
        tr["mfu_compile"] = self.mfu("train.mfu_compile", tr["flops_per_image"], tr["tvtool_compile_images_per_s"])
        tr["peak_memory_gb"] = {"without_penalty": plain["peak_memory_gb"], "with_penalty": exact["peak_memory_gb"]}
        if not self.cuda:
            self.skip("train.peak_memory_gb", "device memory is measured on CUDA only")
        # issue 22: the split streamed from the cache file by the prefetch thread against the same split held on the
        # device (goal >= 0.95x on a GPU)
        tr["streamed_over_held"] = self.guarded("train.streamed_over_held", lambda: (
            self.finetune_run("streamed")["images_per_s"] / self.finetune_run("held")["images_per_s"]))

    def arm_orthoreg(self) -> None:
        from tvtool.train import CUDA_GRAPH_MODES

        a, o = self.args, self.res["orthoreg"]
        o["batch"] = a.batch
        base = self.finetune_run("plain")["step_s"]
        o["step_s_without_penalty"] = base
        for name in ("exact", "hutchinson", "exact_tf32"):
            o[f"{name}_overhead"] = self.guarded(f"orthoreg.{name}_overhead",
                                                 lambda: self.finetune_run(name)["step_s"] / base - 1)
        if not self.cuda:
            o["note"] = "TF32 exists on CUDA only: on the CPU exact_tf32 repeats exact"
        # the penalty inside the compiled step (with reduce-overhead: inside the CUDA graphs), against the same
        # compiled step without it
        o["compiled_exact_overhead"] = None
        why = self.compile_possible()
        if why is not None:
            self.skip("orthoreg.compiled_exact_overhead", why)
            return
        try:
            c_base = self.compile_run("compile")["step_s"]
            c_exact = self.compile_run("compile_exact")["step_s"]
        except Exception:
            self.skip("orthoreg.compiled_exact_overhead", self.compile_error)
            self.res.setdefault("errors", {})["orthoreg.compile"] = self.compile_error
            return
        o.update(compiled_step_s_without_penalty=c_base, compiled_step_s_with_penalty=c_exact,
                 compiled_exact_overhead=c_exact / c_base - 1, compile_backend=a.compile_backend,
                 compile_mode=a.compile_mode if a.compile_backend == "inductor" else None,
                 graph_captured=self.cuda and a.compile_backend == "inductor" and a.compile_mode in CUDA_GRAPH_MODES,
                 note="compiled_exact_overhead: the step with the exact penalty inside the compiled step (and, with "
                      "reduce-overhead, inside its CUDA graphs) over the same compiled step without it, minus 1")

    def arm_vitl(self) -> None:
        """The paper's large model: ViT-L-14 at its recipe's batch, 64 x 2 gradient-accumulation micro-batches
        (eager: CUDA-graph modes cannot accumulate), without and with the exact penalty (the paper: 158 min and
        42.6 GB per run, +12% time and +4.5% memory with OrthoReg, on its own hardware)."""
        a, v = self.args, self.res["vitl"]
        v.update(model=a.vitl_model, batch=a.batch, micro_batch=a.batch // 2, grad_accum=2, warmup=a.vitl_warmup,
                 steps=a.vitl_steps, compiled=False,
                 paper={"minutes": 158, "memory_gb": 42.6, "orthoreg_time_overhead": 0.12,
                        "orthoreg_memory_overhead": 0.045})
        plain = self.finetune_run("vitl_plain")
        v.update(images_per_s=plain["images_per_s"], step_s=plain["step_s"],
                 minutes_per_2000_steps=plain["step_s"] * 2000 / 60)
        self.save()
        exact = self.guarded("vitl.exact_overhead", lambda: self.finetune_run("vitl_exact"))
        v["penalty_images_per_s"] = exact and exact["images_per_s"]
        v["exact_overhead"] = exact and exact["step_s"] / plain["step_s"] - 1
        v["peak_memory_gb"] = {"without_penalty": plain["peak_memory_gb"],
                               "with_penalty": exact and exact["peak_memory_gb"]}
        mem = v["peak_memory_gb"]
        v["memory_overhead"] = (mem["with_penalty"] / mem["without_penalty"] - 1
                                if mem["with_penalty"] and mem["without_penalty"] else None)
        if not self.cuda:
            self.skip("vitl.peak_memory_gb", "device memory is measured on CUDA only")
            self.skip("vitl.memory_overhead", "device memory is measured on CUDA only")
        v["flops_per_image"] = flops_per_image(a.vitl_model, self.device, min(a.batch // 2, 8))
        v["mfu"] = self.mfu("vitl.mfu", v["flops_per_image"], v["images_per_s"])

    def arm_eval(self) -> None:
        self.res["eval"].update(eval_search(self.args, self.device, self.tmp))

    def arm_merge(self) -> None:
        m = self.res["merge"]
        size = self.args.merge_size
        shapes = bench_merge.vit_b32_visual_shapes(size)
        m.update(vectors=MERGE_VECTORS, width_scale=size, params_per_vector=sum(math.prod(s) for s in shapes.values()),
                 timing="one key per distinct 2-D shape timed, times its key count; other keys timed in full")
        for method in MERGE_METHODS:
            gpu = time_merge(method, shapes, "cuda") if self.cuda else None
            cpu = time_merge(method, shapes, "cpu")
            m[method] = {"gpu_s": gpu and gpu["seconds"], "cpu_s": cpu["seconds"]}
            if gpu:
                m[method]["gpu_vs_cpu_max_rel_diff"] = max(
                    float((g - c).norm() / c.norm().clamp(min=1e-30)) for g, c in zip(gpu["outputs"], cpu["outputs"]))
                m[method]["speedup"] = cpu["seconds"] / gpu["seconds"]
            else:
                self.skip(f"merge.{method}.gpu_s", "no GPU")
            self.save()

    def arm_checks(self) -> None:
        """Each check on its own: one that raises is recorded (null, reason, error) and the others still run."""
        wanted = set(self.args.checks.split(",")) if self.args.checks else None
        for name, check in (("compiled_grads_match_eager", self.check_compiled_grads),
                            ("sdpa_fused_in_training", self.check_sdpa),
                            ("compiled_matches_eager", self.check_compile),
                            ("penalty_same_in_bf16", self.check_penalty),
                            ("random_resized_crop_matches_torchvision", self.check_crop),
                            ("bf16_matches_fp32", self.check_bf16),
                            ("ddp_matches_single", self.check_ddp), ("fsdp_matches_single", self.check_fsdp),
                            ("compiled_grads_match_eager_fp32", self.check_compiled_grads_fp32)):
            if wanted is not None and name not in wanted:
                continue
            if self.over_budget(f"checks.{name}"):
                self.res["checks"][name] = None
                continue
            try:
                self.res["checks"][name] = check()
            except Exception as exc:
                self.res["checks"][name] = None
                self.skip(f"checks.{name}", "the check raised (see errors)")
                self.res.setdefault("errors", {})[f"checks.{name}"] = f"{type(exc).__name__}: {exc}"
            self.save()

    def check_bf16(self) -> bool:
        """bf16 vs fp32 finetune: short runs with a learning rate high enough that the curves move."""
        curves = {}
        for prec in ("bf16", "fp32"):
            out = self.tmp / f"check-{prec}"
            out.mkdir(exist_ok=True)
            curves[prec] = run_curve(self, out, prec, lr=1e-4)
        diff = _rel_curve_diff(curves["bf16"], curves["fp32"])
        self.res["checks_detail"]["bf16_vs_fp32"] = {
            "max_step_loss_diff_rel": diff, "tolerance": 0.03, "steps": self.args.check_steps, "lr": 1e-4,
            "curve_fp32": curves["fp32"], "curve_bf16": curves["bf16"]}
        return diff <= 0.03

    def check_compile(self) -> bool | None:
        """Compiled vs eager: the train arm's timed runs (same seed, data, precision), compared at their log steps."""
        why = self.compile_possible()
        if why is not None:
            self.skip("checks.compiled_matches_eager", why)
            return None
        eager = [r["task_loss"] for r in self.finetune_run("plain")["records"]]
        comp = [r["task_loss"] for r in self.compile_run()["records"]]
        tol = 2e-2 if self.cuda else 1e-4  # bf16 autocast on CUDA: fusion changes the rounding
        diff = _rel_curve_diff(comp, eager)
        self.res["checks_detail"]["compiled_vs_eager"] = {"max_logged_loss_diff_rel": diff, "tolerance": tol,
                                                          "logged_points": len(eager)}
        return diff <= tol

    def check_compiled_grads(self, fp32: bool = False) -> bool | None:
        """The gradients themselves (a loss curve at lr 1e-5 on random weights hardly moves, so it would not see
        wrong gradients): eager vs compiled training step (task loss + exact penalty, the compile run's mode), on 3
        fresh batches, graphs replayed; the whole gradient of task + lambda * penalty and the penalty's value."""
        name = "compiled_grads_match_eager" + ("_fp32" if fp32 else "")
        why = self.compile_possible()
        if why is not None:
            self.skip(f"checks.{name}", why)
            return None
        if fp32 and not self.cuda:
            self.skip(f"checks.{name}", "on the CPU the main check already runs in fp32")
            return None
        a = self.args
        d = self.res["checks_detail"]["compiled_grads_vs_eager" + ("_fp32" if fp32 else "")] = \
            compiled_grads_vs_eager(a.model, self.device, min(a.batch, 32), a.compile_mode, a.compile_backend,
                                    a.lam, bf16=self.cuda and not fp32)
        return d["max_grad_rel_diff"] <= d["tolerance"] and d["max_penalty_rel_diff"] <= d["penalty_tolerance"]

    def check_compiled_grads_fp32(self) -> bool | None:
        return self.check_compiled_grads(fp32=True)

    def check_sdpa(self) -> bool:
        d = self.res["checks_detail"]["sdpa"] = sdpa_kernels(self.args.model, self.device)
        return d["match"]

    def check_penalty(self) -> bool:
        d = self.res["checks_detail"]["penalty_bf16"] = penalty_under_bf16(self.args.model, self.device)
        return d["rel_diff"] <= d["tolerance"]

    def check_crop(self) -> bool:
        d = self.res["checks_detail"]["random_resized_crop"] = crop_statistics(self.device, self.args.crop_samples)
        return d["match"]

    def check_ddp(self) -> bool | None:
        n_gpu = torch.cuda.device_count() if self.cuda else 0
        if self.cuda and n_gpu < 2:
            self.skip("checks.ddp_matches_single", f"{n_gpu} GPU: NCCL DDP needs 2 or more")
            return None
        d = self.res["checks_detail"]["ddp"] = ddp_check(self, 2 if not self.cuda else min(n_gpu, 8))
        return d["match"]

    def check_fsdp(self) -> bool | None:
        n_gpu = torch.cuda.device_count() if self.cuda else 0
        if self.cuda and n_gpu < 2:
            self.skip("checks.fsdp_matches_single", f"{n_gpu} GPU: FSDP2 over NCCL needs 2 or more")
            return None
        d = self.res["checks_detail"]["fsdp"] = ddp_check(self, 2 if not self.cuda else min(n_gpu, 8), fsdp=True)
        return d["match"]


# ------------------------------------------------------------------------------------------------ helpers per arm
def run_curve(suite: Suite, out: Path, precision: str, lr: float) -> list[float]:
    """Per-step task losses of a short finetune run (log every step, no lr warm-up)."""
    from tvtool.train import TrainConfig, finetune

    ns = suite.args
    suite.jpeg_dataset()
    losses: list[float] = []
    cfg = TrainConfig(task=bench_train.BENCH_TASK, model=ns.model, pretrained="random", mode="full", lr=lr,
                      batch_size=ns.batch, epochs=1000, max_steps=ns.check_steps, seed=ns.seed,
                      data_root=str(suite.root), device=suite.device, eval=False, log_every=1, warmup_steps=0,
                      precision=precision)
    finetune(cfg, out / "never-written.safetensors", progress=lambda r: losses.append(r["task_loss"]),
             stop_after=ns.check_steps)
    return losses


def flops_per_image(model_name: str, device: str, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from tvtool import heads, models

    torch.manual_seed(0)
    bundle = models.load_clip(model_name, "random", device=device)
    clf = heads.ImageClassifier(bundle.model.visual, torch.randn(10, bundle.model.visual.output_dim, device=device))
    x = torch.randn(batch, 3, bundle.image_size, bundle.image_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(clf(x), y).backward()
    flops = counter.get_total_flops() / batch
    del bundle, clf
    return float(flops)


def compiled_grads_vs_eager(model_name: str, device: str, batch: int, mode: str, backend: str, lam: float,
                            bf16: bool, steps: int = 3) -> dict:
    """Relative L2 difference of the whole gradient of task loss + lam * exact penalty, eager vs the torch.compile'd
    training step (tvtool.train.TrainStep: classifier and penalty in one compiled graph, finetune's autocast and
    CUDA-graph step marking), over ``steps`` fresh batches at the same weights (moved off theta_0 so the penalty's
    gradient is not zero): replays included. Also the penalty's value, fp32 on both sides."""
    from tvtool import heads, models, variants
    from tvtool.orthoreg import OrthoReg
    from tvtool.train import CUDA_GRAPH_MODES, TrainStep

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    bundle = models.load_clip(model_name, "random", device=device)
    tuned = variants.prepare(bundle.model, "full")
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(1e-3 * torch.randn_like(p))
    reg = OrthoReg.from_tuned(tuned)
    head = torch.randn(10, bundle.model.visual.output_dim, device=device)
    step = TrainStep(heads.ImageClassifier(tuned.module, head), reg, bf16).to(device).train()
    params = [p for _, p in tuned.named_trainable()]
    if backend == "inductor":
        compiled, graphs = torch.compile(step, mode=mode, dynamic=False), cuda and mode in CUDA_GRAPH_MODES
    else:
        compiled, graphs = torch.compile(step, backend=backend, dynamic=False), False
    size = bundle.image_size
    g = torch.Generator(device=device).manual_seed(1)
    diffs, pen_diffs, shares = [], [], []
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, device=device, generator=g)
        y = torch.randint(0, 10, (batch,), device=device, generator=g)
        grads, pens = [], []
        for model in (step, compiled):
            for p in params:
                p.grad = None
            if model is compiled and graphs:
                torch.compiler.cudagraph_mark_step_begin()
            task, pen = model(x, y)
            pens.append(float(pen.detach()))
            (task + lam * pen).backward()
            grads.append(torch.cat([p.grad.double().flatten() for p in params]))
        diffs.append(float((grads[1] - grads[0]).norm() / grads[0].norm()))
        pen_diffs.append(abs(pens[1] - pens[0]) / abs(pens[0]))
        for p in params:  # how much of the gradient is the penalty's (so the check can see it)
            p.grad = None
        task, _ = step(x, y)
        task.backward()
        task_only = torch.cat([p.grad.double().flatten() for p in params])
        shares.append(float((grads[0] - task_only).norm() / grads[0].norm()))
    # bf16 autocast on CUDA: fused kernels round differently; fp32 (and aot_eager on the CPU): summation order only
    tol = 5e-2 if bf16 else (1e-3 if cuda else 1e-6)
    return {"max_grad_rel_diff": max(diffs), "per_batch": diffs, "tolerance": tol,
            "max_penalty_rel_diff": max(pen_diffs), "penalty_tolerance": 1e-5 if cuda else 1e-6,
            "penalty_share_of_gradient": shares, "lam": lam, "bf16": bf16,
            "batch": batch, "mode": mode if backend == "inductor" else None, "backend": backend}


def sdpa_kernels(model_name: str, device: str) -> dict:
    """The attention kernels one training forward + backward of the image tower runs (finetune's autocast): every
    block must use a fused scaled_dot_product_attention kernel (flash / memory-efficient / cuDNN on CUDA, the
    CPU flash kernel on the CPU) and no explicit softmax (tests/test_attention.py shows the outputs and gradients
    equal attention written out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tvtool import heads, models, variants

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    bundle = models.load_clip(model_name, "random", device=device)
    tuned = variants.prepare(bundle.model, "full")
    clf = heads.ImageClassifier(tuned.module, torch.randn(10, bundle.model.visual.output_dim, device=device))
    clf = clf.to(device).train()
    x = torch.randn(4, 3, bundle.image_size, bundle.image_size, device=device)
    with OpLog() as log, torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
        clf(x).float().sum().backward()
    layers = len(tuned.module.transformer.resblocks)
    attention = sorted({o for o in log.ops if "scaled_dot_product" in o})
    fused = [o for o in log.ops if "_scaled_dot_product_" in o and "backward" not in o]
    softmax = [o for o in log.ops if "softmax" in o]
    return {"kernels": attention, "fused_calls": len(fused), "blocks": layers, "softmax_ops": len(softmax),
            "match": len(fused) == layers and not softmax}


def penalty_under_bf16(model_name: str, device: str) -> dict:
    """The exact penalty at a random dW, computed plainly and under bf16 autocast (as finetune calls it)."""
    from tvtool import models, variants
    from tvtool.orthoreg import OrthoReg

    torch.manual_seed(0)
    bundle = models.load_clip(model_name, "random", device=device)
    tuned = variants.prepare(bundle.model, "full")
    reg = OrthoReg.from_tuned(tuned)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(1e-2 * torch.randn_like(p))
    with torch.no_grad():
        plain = reg.penalty().double()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            mixed = reg.penalty().double()
    rel = float((plain - mixed).abs() / plain.abs())
    return {"fp32": float(plain), "under_bf16_autocast": float(mixed), "rel_diff": rel, "tolerance": 1e-6}


def crop_statistics(device: str, samples: int, size: int = 32, side: int = 96) -> dict:
    """tvtool.train.random_resized_crop vs torchvision's RandomResizedCrop (scale 0.9-1, the protocol's) on a
    coordinate image: the crops' width, height and centre (fractions of the image side) must have the same means
    and standard deviations within 0.01 (sampling error at the default 2000 samples is ~0.001)."""
    import torchvision.transforms as T

    from tvtool.train import random_resized_crop

    ys, xs = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    img = torch.stack([xs, ys, torch.zeros_like(xs)])[None]  # channel 0 = x, channel 1 = y

    def stats(out: torch.Tensor) -> torch.Tensor:  # out: [N, 3, S, S] -> [N, 4] (width, height, cx, cy)
        q1, q3 = size // 4, 3 * size // 4
        width = (out[:, 0, :, q3] - out[:, 0, :, q1]).mean(-1) * size / (q3 - q1)
        height = (out[:, 1, q3, :] - out[:, 1, q1, :]).mean(-1) * size / (q3 - q1)
        return torch.stack([width, height, out[:, 0].mean((-1, -2)), out[:, 1].mean((-1, -2))], 1)

    gen = torch.Generator(device=device).manual_seed(0)
    ours = stats(random_resized_crop(img.to(device).expand(samples, -1, -1, -1).contiguous(), size, gen).cpu())
    torch.manual_seed(0)
    tv = T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=False)
    theirs = stats(torch.cat([tv(img) for _ in range(samples)]))
    names = ("width", "height", "center_x", "center_y")
    out = {"samples": samples, "tolerance": 0.01}
    ok = True
    for i, n in enumerate(names):
        m_o, m_t = float(ours[:, i].mean()), float(theirs[:, i].mean())
        s_o, s_t = float(ours[:, i].std()), float(theirs[:, i].std())
        out[n] = {"tvtool_mean": m_o, "torchvision_mean": m_t, "tvtool_std": s_o, "torchvision_std": s_t}
        ok &= abs(m_o - m_t) <= 0.01 and abs(s_o - s_t) <= 0.01
    aspect = lambda st: (st[:, 0] / st[:, 1])  # noqa: E731
    out["aspect_p99"] = {"tvtool": float(aspect(ours).quantile(0.99)),
                         "torchvision": float(aspect(theirs).quantile(0.99))}
    out["match"] = bool(ok)
    return out


def eval_search(args, device: str, tmp: Path) -> dict:
    """21-point alpha search over the 8 mini tasks' Val sets: Evaluator vs re-building per point."""
    from safetensors.torch import save_file

    from tvtool import datasets, evaluate as ev
    from tvtool.datasets.mini import MINI_TASKS
    from tvtool.heads import zero_shot_head
    from tvtool.models import load_clip

    tasks = list(MINI_TASKS)[:args.eval_tasks]
    cap = args.eval_examples
    grid = [i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    torch.manual_seed(0)
    bundle = load_clip(args.model, "random", device="cpu")
    weights = tmp / "eval-base.safetensors"
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(weights))
    size = bundle.image_size
    g = torch.Generator().manual_seed(1)
    total = {}
    for _ in range(MERGE_VECTORS):  # 8 random task vectors, summed (task addition)
        for k, p in bundle.model.visual.named_parameters():
            tau = 1e-3 * torch.randn(p.shape, generator=g)
            total["visual." + k] = total["visual." + k] + tau if "visual." + k in total else tau
    del bundle
    n_val = {t: int(datasets.load_split(t, "val", None, size)[1][:cap].numel()) for t in tasks}  # generated, cached
    res = {"tasks": tasks, "val_examples": n_val, "image_size": size, "grid_points": GRID_POINTS,
           "vectors": MERGE_VECTORS, "data": "the mini tasks' Val splits (synthetic), resized to the model's input"}

    _sync(device)
    t0 = time.perf_counter()
    bundle = load_clip(args.model, str(weights), device=device)
    evaluator = ev.Evaluator(bundle, tasks, None, ("val",), device, max_examples=cap)
    tot = {k: v.to(device) for k, v in total.items()}
    fast = []
    for a in grid:
        evaluator.set_weights(tot, a)
        fast.append(evaluator.accuracies(tasks, "val"))
    _sync(device)
    res["evaluator_s"] = time.perf_counter() - t0
    del evaluator, bundle, tot

    points = grid[:max(1, min(args.rebuild_points, GRID_POINTS))]
    t0 = time.perf_counter()
    slow = []
    for a in points:  # everything alpha-independent built again, as a loop over `tvtool eval` calls would
        b = load_clip(args.model, str(weights), device=device)
        with torch.no_grad():
            params = dict(b.model.visual.named_parameters())
            for k, v in total.items():
                params[k[len("visual."):]].add_(v.to(device), alpha=a)
        heads = {t: zero_shot_head(b, datasets.get_dataset(t), cache=False) for t in tasks}
        inputs = {(t, "val"): tuple(z[:cap] for z in datasets.load_split(t, "val", None, size)) for t in tasks}
        e = ev.Evaluator.from_parts(b.model.visual, heads, inputs, b.mean, b.std, device)
        slow.append(e.accuracies(tasks, "val"))
        del e, b
    _sync(device)
    res["rebuild_points_timed"] = len(points)
    res["rebuild_s"] = (time.perf_counter() - t0) * GRID_POINTS / len(points)
    res["speedup"] = res["rebuild_s"] / res["evaluator_s"]
    res["accuracies_identical"] = all(abs(f[t] - s[t]) < 1e-9 for f, s in zip(fast, slow) for t in tasks)
    return res


def time_merge(method: str, shapes: dict[str, tuple], device: str) -> dict:
    """Seconds for merging MERGE_VECTORS random vectors of ``shapes`` with ``method`` on ``device`` (the merge
    module's compute device is pinned to it), inputs on the CPU as the streaming driver reads them."""
    from tvtool import merge as mg

    by_shape: dict[tuple, list[str]] = {}
    for k, s in shapes.items():
        by_shape.setdefault(tuple(s) if len(s) == 2 else ("1d", k), []).append(k)
    with mg.on_device(device):
        if device.startswith("cuda"):  # solver and context start-up outside the timing
            mg.merge_tensor(method, [torch.randn(64, 48) for _ in range(MERGE_VECTORS)], "warm-up")
            torch.cuda.synchronize()
        seconds, outputs = 0.0, []
        for group, keys in by_shape.items():
            g = torch.Generator().manual_seed(len(keys) * 7919 + sum(map(ord, keys[0])))
            xs = [torch.randn(shapes[keys[0]], generator=g) * 1e-3 * (1 + t) for t in range(MERGE_VECTORS)]
            _sync(device)
            t = time.perf_counter()
            out = mg.merge_tensor(method, xs, keys[0])
            _sync(device)
            seconds += (time.perf_counter() - t) * len(keys)
            outputs.append(out.cpu())
    return {"seconds": seconds, "outputs": outputs}


def ddp_config(model: str, batch: int, steps: int, seed: int, data_root: str, device: str, lam: float,
               fsdp: bool = False, grad_accum: int = 2):
    from tvtool.train import TrainConfig

    # the exact penalty and 2 accumulation micro-batches: DDP's no_sync and the penalty's once-per-step gradient
    # are part of what must equal one process
    return TrainConfig(task=bench_train.BENCH_TASK, model=model, pretrained="random", mode="full", lr=1e-4,
                       batch_size=batch, grad_accum=grad_accum, epochs=1000, max_steps=steps, seed=seed, data_root=data_root,
                       device=device, eval=False, warmup_steps=0, precision="fp32", lam=lam, fsdp=fsdp)


def ddp_check(suite: Suite, world: int, fsdp: bool = False) -> dict:
    """finetune under torchrun (``world`` processes: NCCL on GPUs, gloo on the CPU; DDP, or FSDP2 with ``fsdp``) vs
    one process, both fp32, exact penalty, 2 accumulation micro-batches: every rank draws the step's crops for the
    global batch and takes its slice, so the task vectors must agree (only the order of float sums differs)."""
    from tvtool.taskvector import open_vector
    from tvtool.train import finetune

    a = suite.args
    suite.jpeg_dataset()
    device = "cuda" if suite.cuda else "cpu"
    tag = "fsdp" if fsdp else "ddp"
    single, multi = suite.tmp / "dp-1.safetensors", suite.tmp / f"{tag}-{world}.safetensors"
    # the noise floor: the same run in one process with 4 micro-batches instead of 2 (the same math, other float
    # sums), magnified by AdamW's first steps exactly as the multi-process run's are. Both one-process runs are
    # shared by the DDP and FSDP checks.
    floor_run = suite.tmp / "dp-floor.safetensors"
    t = time.perf_counter()
    for path, accum in ((single, 2), (floor_run, 4)):
        if not path.exists():
            finetune(ddp_config(a.model, a.batch, a.check_steps, a.seed, str(suite.root), device, a.lam,
                                grad_accum=accum), path)
    t_single = time.perf_counter() - t
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--ddp-child", str(multi), "--model", a.model, "--batch", str(a.batch), "--device", device,
           "--data-root", str(suite.root), "--classes", str(a.classes), "--check-steps", str(a.check_steps),
           "--seed", str(a.seed), "--lam", str(a.lam)] + (["--fsdp"] if fsdp else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    if proc.returncode != 0:
        return {"match": False, "error": (proc.stderr or proc.stdout).strip().splitlines()[-5:]}
    t_multi = time.perf_counter() - t

    def rel(x, y) -> float:
        x, y = open_vector(x), open_vector(y)
        num = sum(float((y.get(k).double() - x.get(k).double()).norm() ** 2) for k in y.keys())
        den = sum(float(y.get(k).double().norm() ** 2) for k in y.keys())
        return math.sqrt(num / max(den, 1e-300))

    diff, floor = rel(multi, single), rel(floor_run, single)
    # AdamW's first steps divide by sqrt(v), so entries with near-zero gradients magnify any change of summation
    # order: after 4 steps (tvtool-mini, lambda 10) a vector differs by about 1e-3 from the same run with other
    # float sums; a sharding mistake gives O(1) (0.54 measured when the ranks' crops differed). The step gradients
    # themselves agree to 1e-5 (tests/test_parallel.py). Tolerance: 1e-3 or 3x the floor, whichever is larger.
    tol = max(1e-3, 3 * floor)
    return {"world": world, "backend": "nccl" if suite.cuda else "gloo", "strategy": tag, "lam": a.lam,
            "grad_accum": 2, "vector_rel_diff": diff, "noise_floor_rel_diff": floor, "tolerance": tol,
            "match": diff <= tol, "seconds": {"single": t_single, "torchrun": t_multi}}


def ddp_child(args) -> None:
    """Run under torchrun by ddp_check: the same short fp32 finetune, writing its vector."""
    from tvtool.train import finetune

    bench_train.register_bench_dataset(Path(args.data_root), args.classes)
    finetune(ddp_config(args.model, args.batch, args.check_steps, args.seed, args.data_root, args.device, args.lam,
                        args.fsdp), args.ddp_child, force=True)


# ------------------------------------------------------------------------------------------------ main
def table(res: dict) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                      else str(v))

    tr, o, v, e, m, c = (res.get(k, {}) for k in ("train", "orthoreg", "vitl", "eval", "merge", "checks"))
    pm = tr.get("peak_memory_gb") or {}
    vm = v.get("peak_memory_gb") or {}
    mode = tr.get("compile_mode") or tr.get("compile_backend") or "-"
    rows = [
        ("train: reference-style loop (images/s)", f(tr.get("reference_images_per_s"))),
        ("train: tvtool finetune, eager (images/s; x reference, same run)",
         f"{f(tr.get('tvtool_images_per_s'))} ({f(tr.get('speedup_vs_reference'))}x)"),
        (f"train: tvtool finetune --compile-mode {mode} (images/s; x reference, same run)",
         f"{f(tr.get('tvtool_compile_images_per_s'))} ({f(tr.get('speedup_compile_vs_reference'))}x)"),
        ("train: tvtool finetune + exact penalty, eager (images/s)", f(tr.get("tvtool_penalty_images_per_s"))),
        ("train: MFU eager / compiled (bf16 dense peak)",
         f"{f(tr.get('mfu'), '{:.1%}')} / {f(tr.get('mfu_compile'), '{:.1%}')}"),
        ("train: peak memory without / with penalty (GB)",
         f"{f(pm.get('without_penalty'))} / {f(pm.get('with_penalty'))}"),
        ("train: split streamed from the cache / held on the device (images/s ratio; goal >= 0.95)",
         f(tr.get("streamed_over_held"), "{:.3f}")),
        ("orthoreg: exact penalty, fraction of an eager step", f(o.get("exact_overhead"), "{:+.1%}")),
        ("orthoreg: Hutchinson (1 probe)", f(o.get("hutchinson_overhead"), "{:+.1%}")),
        ("orthoreg: exact with TF32 matmuls", f(o.get("exact_tf32_overhead"), "{:+.1%}")),
        (f"orthoreg: exact penalty inside the compiled step ({mode}), fraction of that step",
         f(o.get("compiled_exact_overhead"), "{:+.1%}")),
        (f"vitl: {v.get('model')}, {v.get('micro_batch')} x 2 accumulation (images/s; MFU)",
         f"{f(v.get('images_per_s'))} ({f(v.get('mfu'), '{:.1%}')})"),
        ("vitl: exact penalty, time / memory overhead (paper: +12% / +4.5%)",
         f"{f(v.get('exact_overhead'), '{:+.1%}')} / {f(v.get('memory_overhead'), '{:+.1%}')}"),
        ("vitl: peak memory without / with penalty (GB; paper 42.6)",
         f"{f(vm.get('without_penalty'))} / {f(vm.get('with_penalty'))}"),
        ("vitl: minutes per 2000 steps (paper: 158 per run)", f(v.get("minutes_per_2000_steps"), "{:.1f}")),
        ("eval: 21-point alpha search, Evaluator (s)", f(e.get("evaluator_s"))),
        ("eval: 21-point alpha search, re-build per point (s)", f(e.get("rebuild_s"))),
    ]
    for method in MERGE_METHODS:
        r = m.get(method) or {}
        rows.append((f"merge: {method}, GPU / CPU (s)", f"{f(r.get('gpu_s'))} / {f(r.get('cpu_s'))}"))
    for k, v in c.items():
        rows.append((f"check: {k}", f(v)))
    head = f"| {res.get('model')}, batch {res.get('batch')}, {res.get('device')} | value |\n|---|---|\n"
    return head + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="every arm on the CPU with tvtool-mini (minutes)")
    ap.add_argument("--out", default="gpu-suite", help="folder for suite.json")
    ap.add_argument("--model", default=None, help="open_clip architecture (default ViT-B-32; --smoke: tvtool-mini)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (--smoke: 8)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed finetune steps per run (default 10; smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 30; smoke 2)")
    ap.add_argument("--check-steps", type=int, default=None, help="steps of the check runs (default 20; smoke 4)")
    ap.add_argument("--workers", type=int, default=None, help="reference loop's DataLoader workers (default: cores)")
    ap.add_argument("--rebuild-points", type=int, default=None,
                    help="grid points the re-build path is timed on, scaled to 21 (default 7; smoke 3)")
    ap.add_argument("--merge-size", type=float, default=None, help="width scale of the merge vectors "
                    "(1.0 = ViT-B-32, default; smoke 0.1)")
    ap.add_argument("--crop-samples", type=int, default=None, help="RandomResizedCrop check (default 2000; smoke 500)")
    ap.add_argument("--eval-tasks", type=int, default=None, help="mini tasks in the alpha search (default 8; smoke 2)")
    ap.add_argument("--eval-examples", type=int, default=None,
                    help="first N Val examples per task (default: all; smoke 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; smoke 1)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compile run (default inductor; --smoke: aot_eager)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile run (recorded as skipped)")
    ap.add_argument("--checks", default=None, help="with the checks arm: only these (comma-separated names)")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="finetune --compile-mode of the compile run (default reduce-overhead: CUDA graphs, the "
                         "fastest on an H100, 2026-11-24; the compiled-vs-eager check then covers it)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no arm or check after this many seconds (default 540 on a GPU: the suite then ends "
                         "within a 10-minute window; 0 = no limit; smoke: no limit)")
    ap.add_argument("--data-root", default=None, help=argparse.SUPPRESS)  # --ddp-child only
    ap.add_argument("--ddp-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)  # --ddp-child only
    ap.add_argument("--vitl-model", default=None, help="model of the vitl arm (default ViT-L-14; smoke tvtool-mini)")
    ap.add_argument("--vitl-warmup", type=int, default=None, help="vitl arm: untimed steps (default 3; smoke 1)")
    ap.add_argument("--vitl-steps", type=int, default=None, help="vitl arm: timed steps (default 10; smoke 2)")
    args = ap.parse_args(argv)
    if args.ddp_child:
        return ddp_child(args)

    from tvtool import models

    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else models.default_device())
    defaults = {"model": ("ViT-B-32", "tvtool-mini"), "batch": (128, 8), "warmup": (10, 1), "steps": (30, 2),
                "check_steps": (20, 4), "workers": (os.cpu_count() or 2, 1), "rebuild_points": (7, 3),
                "merge_size": (1.0, 0.1), "compile_backend": ("inductor", "aot_eager"),
                "crop_samples": (2000, 500), "eval_tasks": (8, 2), "eval_examples": (None, 16), "threads": (None, 1),
                "vitl_model": ("ViT-L-14", "tvtool-mini"), "vitl_warmup": (3, 1), "vitl_steps": (10, 2),
                "budget_s": (540.0, 0.0)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [x.strip() for x in args.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    if not smoke and not args.device.startswith("cuda"):
        print("# no GPU: figures from this run are CPU figures (use --smoke for the quick CPU check)", flush=True)

    suite = Suite(args)
    os.environ["TVTOOL_CACHE"] = str(suite.tmp / "cache")  # dataset + head caches: never the user's
    res = suite.res
    res["device"] = (torch.cuda.get_device_name(torch.device(args.device)) if suite.cuda
                     else (platform.processor() or platform.machine() or "cpu"))
    res["settings"].update({k: v for k, v in vars(args).items() if k not in ("ddp_child", "data_root", "fsdp")})
    res["settings"].update(torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
                           gpus=torch.cuda.device_count() if suite.cuda else 0)
    t_all = time.perf_counter()
    try:
        for arm in arms:
            t = time.perf_counter()
            if suite.over_budget(arm):
                print(f"# {arm} not started: time budget spent", flush=True)
                continue
            print(f"# {arm} ...", flush=True)
            try:
                getattr(suite, f"arm_{arm}")()
            except Exception as exc:  # one broken arm must not cost the others' figures
                res.setdefault("errors", {})[arm] = f"{type(exc).__name__}: {exc}"
                print(f"# {arm} failed: {type(exc).__name__}: {exc}", flush=True)
            res["arm_seconds"][arm] = time.perf_counter() - t
            res["wall_s"] = time.perf_counter() - t_all
            suite.save()
    finally:
        import shutil

        shutil.rmtree(suite.tmp, ignore_errors=True)
    print(table(res))
    print(f"# wrote {Path(args.out) / 'suite.json'} in {res['wall_s']:.0f} s", flush=True)
    return res


if __name__ == "__main__":
    main()
