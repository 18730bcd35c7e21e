"""benchmarks/gpu_suite.py --smoke: every arm runs on the CPU with a tiny model and writes every required figure,
so the GPU suite cannot rot between the rare GPU windows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = (int, float)

# dotted path -> type; a number may be null only when `skipped` names it (or a parent) with a reason
REQUIRED = {
    "device": str, "model": str, "batch": int,
    "train.reference_images_per_s": NUMBER, "train.tvtool_images_per_s": NUMBER,
    "train.tvtool_compile_images_per_s": NUMBER, "train.mfu": NUMBER, "train.mfu_compile": NUMBER,
    "train.speedup_vs_reference": NUMBER, "train.speedup_compile_vs_reference": NUMBER,
    "train.peak_memory_gb.without_penalty": NUMBER, "train.peak_memory_gb.with_penalty": NUMBER,
    "train.streamed_over_held": NUMBER,
    "orthoreg.exact_overhead": NUMBER, "orthoreg.hutchinson_overhead": NUMBER, "orthoreg.exact_tf32_overhead": NUMBER,
    "orthoreg.compiled_exact_overhead": NUMBER,
    "vitl.images_per_s": NUMBER, "vitl.step_s": NUMBER, "vitl.exact_overhead": NUMBER, "vitl.mfu": NUMBER,
    "vitl.minutes_per_2000_steps": NUMBER, "vitl.memory_overhead": NUMBER,
    "vitl.peak_memory_gb.without_penalty": NUMBER, "vitl.peak_memory_gb.with_penalty": NUMBER,
    "eval.evaluator_s": NUMBER, "eval.rebuild_s": NUMBER,
    "merge.tsv.gpu_s": NUMBER, "merge.tsv.cpu_s": NUMBER, "merge.iso-c.gpu_s": NUMBER, "merge.iso-c.cpu_s": NUMBER,
}
CHECKS = ("bf16_matches_fp32", "compiled_matches_eager", "compiled_grads_match_eager", "penalty_same_in_bf16",
          "random_resized_crop_matches_torchvision", "ddp_matches_single", "fsdp_matches_single",
          "sdpa_fused_in_training")


def _get(d: dict, path: str):
    node = d
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"suite.json lacks {path}"
        node = node[part]
    return node


def _skip_reason(res: dict, path: str) -> str | None:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        reason = res["skipped"].get(".".join(parts[:i]))
        if reason:
            return reason
    return None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "suite.json").read_text()), proc.stdout


def test_smoke_writes_every_required_field_with_its_type(smoke):
    res, _ = smoke
    assert "errors" not in res, res.get("errors")
    assert res["model"] == "tvtool-mini" and res["batch"] == 8 and res["smoke"] is True
    for path, kind in REQUIRED.items():
        value = _get(res, path)
        if value is None:
            assert _skip_reason(res, path), f"{path} is null without a reason under 'skipped'"
        else:
            assert isinstance(value, kind) and not isinstance(value, bool), (path, value)
            if path.endswith(("_per_s", "_s")):
                assert value > 0, (path, value)
    # on the CPU exactly the GPU-only figures are null, each with its reason
    nulls = {p for p in REQUIRED if _get(res, p) is None}
    assert nulls == {"train.mfu", "train.mfu_compile", "train.peak_memory_gb.without_penalty",
                     "train.peak_memory_gb.with_penalty", "merge.tsv.gpu_s", "merge.iso-c.gpu_s", "vitl.mfu",
                     "vitl.peak_memory_gb.without_penalty", "vitl.peak_memory_gb.with_penalty",
                     "vitl.memory_overhead"}, nulls
    assert res["vitl"]["grad_accum"] == 2 and res["vitl"]["micro_batch"] == 4 and res["vitl"]["model"] == "tvtool-mini"


def test_smoke_checks_are_booleans_from_real_comparisons(smoke):
    res, _ = smoke
    for name in CHECKS:
        assert isinstance(res["checks"][name], bool), (name, res["checks"][name])
    detail = res["checks_detail"]
    assert len(detail["bf16_vs_fp32"]["curve_fp32"]) == len(detail["bf16_vs_fp32"]["curve_bf16"]) == 4
    assert detail["bf16_vs_fp32"]["curve_fp32"] != detail["bf16_vs_fp32"]["curve_bf16"]  # two precisions really ran
    for strategy in ("ddp", "fsdp"):
        d = detail[strategy]
        assert d["world"] == 2 and d["backend"] == "gloo" and d["strategy"] == strategy and d["lam"] > 0, d
    # the fp32 variant of the gradient check is a CUDA-only extra (on the CPU the main check is fp32 already)
    assert res["checks"]["compiled_grads_match_eager_fp32"] is None
    assert res["skipped"]["checks.compiled_grads_match_eager_fp32"]
    assert detail["sdpa"]["fused_calls"] == detail["sdpa"]["blocks"] == 4 and detail["sdpa"]["softmax_ops"] == 0
    assert detail["random_resized_crop"]["samples"] == 500
    # the smoke run exercised the compiled finetune, the equality of the two eval paths and the penalty check
    assert res["train"]["compile_backend"] == "aot_eager"
    assert detail["compiled_vs_eager"]["logged_points"] == 3
    assert res["eval"]["accuracies_identical"] is True and res["eval"]["grid_points"] == 21
    assert detail["penalty_bf16"]["fp32"] > 0
    grads = detail["compiled_grads_vs_eager"]
    assert len(grads["per_batch"]) == 3 and res["checks"]["compiled_grads_match_eager"] is True, grads
    assert grads["tolerance"] == 1e-6 and min(grads["penalty_share_of_gradient"]) > 1e-3, grads


def test_smoke_prints_the_markdown_table(smoke):
    _, stdout = smoke
    assert "| tvtool-mini, batch 8," in stdout
    for row in ("reference-style loop", "--compile-mode aot_eager", "exact penalty", "inside the compiled step",
                "vitl: tvtool-mini, 4 x 2 accumulation", "alpha search", "merge: tsv", "check: ddp_matches_single",
                "check: fsdp_matches_single"):
        assert row in stdout, row


def test_profile_smoke_times_every_part_and_the_real_loop(tmp_path):
    """benchmarks/gpu_profile.py --smoke: every part of the step timed, the real finetune loop timed per variant
    and profiled, the TF32-vs-fp32 penalty error recorded (0 on the CPU, where TF32 does not exist)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "--smoke", "--out", str(tmp_path),
                    "--loop-variants", "eager,eager+penalty", "--loop-timed", "2"],
                   check=True, capture_output=True, text=True, env=env, timeout=600)
    res = json.loads((tmp_path / "profile.json").read_text())
    for part in ("data", "fwd_bwd_eager", "penalty_fwd_bwd", "penalty_fwd_bwd_tf32", "clip_and_adamw",
                 "whole_step_eager", "fwd_bwd_eager_b16"):
        assert res["ms"][part] > 0, part
    assert set(res["loop_images_per_s"]) == {"eager", "eager+penalty"}
    assert all(v > 0 for v in res["loop_images_per_s"].values())
    assert res["profile_loop"]["top_cpu_ops"], "the real loop was not profiled"
    assert res["penalty_tf32_grad_rel_error"] == 0.0
