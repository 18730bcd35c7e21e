"""The training step under torch.compile: task loss + OrthoReg penalty in one compiled graph, equal to the eager step.

The penalty's kernel is a torch.library custom op pair (tvtool::gram_defect and its hand-derived gradient), so the
compiler captures it instead of breaking the graph; these tests check that it is really inside the captured graph
and that value and gradient equal the eager computation in fp32 to 1e-6 relative, for every form, scope and mode.
The backend is aot_eager (graph capture + AOTAutograd's joint forward/backward, no code generation): the same
graphs inductor receives, in seconds. Inductor itself (a C++ build of about a minute on 2 cores) is the
``benchmark``-marked test at the end.
"""
import open_clip
import pytest
import torch

from tvtool.heads import ImageClassifier
from tvtool.orthoreg import OrthoReg
from tvtool.train import TrainStep
from tvtool.variants import prepare

REL = 1e-6  # fp32, value and gradient


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # each case builds new modules: without a reset dynamo would pile up recompilations of the same code objects
    # and, past its recompile limit, silently run them eagerly (a vacuous comparison)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_clip():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=16, layers=1, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )


def build(mode, scope="visual-linear", form="squared", estimator="exact"):
    """A prepared tiny CLIP moved away from theta_0 (so the penalty's gradient is not zero), its penalty, the step."""
    tuned = prepare(tiny_clip(), mode, lora_rank=4, lora_alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    reg = OrthoReg.from_tuned(tuned, scope=scope, form=form, estimator=estimator, probes=3)
    step = TrainStep(ImageClassifier(tuned.module, torch.randn(5, 24, generator=g)), reg, bf16=False).train()
    x = torch.randn(4, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    return tuned, reg, step, x, y


def spy_backend(graphs):
    """aot_eager that also keeps the graphs dynamo captured."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def grads(params, loss):
    for p in params:
        p.grad = None
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


@pytest.mark.parametrize("form", ["squared", "plain"])
@pytest.mark.parametrize("scope", ["visual-linear", "reference"])
@pytest.mark.parametrize("mode", ["full", "attn", "lora", "linear"])
def test_compiled_penalty_equals_eager(mode, scope, form):
    """The penalty alone, compiled into one graph (fullgraph: no break allowed) vs eager: value and gradient."""
    tuned, reg, _, _, _ = build(mode, scope, form)
    params = tuned.trainable_parameters()
    graphs = []
    compiled = torch.compile(lambda: reg.penalty(), backend=spy_backend(graphs), fullgraph=True)
    eager_value = reg.penalty()
    eager_grad = grads(params, eager_value)
    value = compiled()
    grad = grads(params, value)
    assert abs(value.item() - eager_value.item()) <= REL * abs(eager_value.item())
    assert rel(grad, eager_grad) <= REL
    assert eager_grad.abs().max() > 0  # the comparison has something to compare
    assert len(graphs) == 1
    ops = str(graphs[0].graph)
    # the exact dense penalty is the custom op; LoRA's exact penalty is plain r x r algebra (no op to capture)
    assert ("gram_defect" in ops) == (mode != "lora"), ops


@pytest.mark.parametrize("mode,scope,form", [("full", "visual-linear", "squared"), ("attn", "reference", "plain"),
                                             ("lora", "visual-linear", "plain"), ("linear", "reference", "squared")])
def test_compiled_step_equals_eager(mode, scope, form):
    """The whole training step (classifier, cross-entropy, penalty) compiled vs eager: task loss, penalty, the
    gradient of task + lambda * penalty and the penalty's own gradient, all to 1e-6. full / attn / lora compile to
    ONE graph holding model and penalty; linear's jvp breaks the graph in torch's own code (the MHA fast-path
    switch), which changes nothing in the values."""
    tuned, reg, step, x, y = build(mode, scope, form)
    params = tuned.trainable_parameters()
    graphs = []
    compiled = torch.compile(step, backend=spy_backend(graphs), dynamic=False)
    lam = 0.3
    e_task, e_pen = step(x, y)
    e_total = grads(params, e_task + lam * e_pen)
    e_pen_grad = grads(params, step(x, y)[1])
    c_task, c_pen = compiled(x, y)
    c_total = grads(params, c_task + lam * c_pen)
    c_pen_grad = grads(params, compiled(x, y)[1])
    assert abs(c_task.item() - e_task.item()) <= REL * abs(e_task.item())
    assert abs(c_pen.item() - e_pen.item()) <= REL * abs(e_pen.item())
    assert rel(c_total, e_total) <= REL
    assert rel(c_pen_grad, e_pen_grad) <= REL
    assert rel(e_total, grads(params, step(x, y)[0])) > 1e-3  # the penalty's share of the gradient is not negligible
    if mode != "linear":
        assert len(graphs) == 1, f"{len(graphs)} graphs: the step broke"
        if mode != "lora":
            assert "gram_defect" in str(graphs[0].graph)


def test_compiled_hutchinson_takes_its_probes_as_input():
    """The Hutchinson estimator draws outside the graph (a torch.Generator cannot be traced) and passes the probes
    in: the compiled step with the same probes equals the eager one."""
    tuned, reg, step, x, y = build("full", estimator="hutchinson")
    params = tuned.trainable_parameters()
    graphs = []
    compiled = torch.compile(step, backend=spy_backend(graphs), dynamic=False)
    probes = reg.draw_probes(torch.Generator().manual_seed(3))
    e_task, e_pen = step(x, y, probes)
    e_grad = grads(params, e_task + e_pen)
    c_task, c_pen = compiled(x, y, probes)
    c_grad = grads(params, c_task + c_pen)
    assert abs(c_pen.item() - e_pen.item()) <= REL * abs(e_pen.item())
    assert rel(c_grad, e_grad) <= REL
    assert len(graphs) == 1
    # the same generator state gives the probes penalty() draws itself
    again = reg.penalty(generator=torch.Generator().manual_seed(3))
    assert again.item() == pytest.approx(e_pen.item(), rel=1e-6)


def test_finetune_compiled_step_matches_eager(tmp_path):
    """finetune --compile (aot_eager backend) with the penalty inside the compiled step: the logged task losses
    and penalties of 3 steps, and the written vector, equal the eager run's."""
    from tvtool.taskvector import open_vector
    from tvtool.train import TrainConfig, finetune

    runs = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": True, "compile_backend": "aot_eager"})):
        records = []
        cfg = TrainConfig(task="mini-shapes", lr=2e-3, warmup_steps=1, batch_size=16, max_steps=3, eval=False,
                          log_every=1, device="cpu", lam=0.5, **extra)
        finetune(cfg, tmp_path / f"{name}.st", progress=records.append)
        runs[name] = records, open_vector(tmp_path / f"{name}.st")
    (er, ev), (cr, cv) = runs["eager"], runs["compiled"]
    for a, b in zip(er, cr):
        assert b["task_loss"] == pytest.approx(a["task_loss"], rel=REL)
        assert b["penalty"] == pytest.approx(a["penalty"], rel=REL)
    num = sum(float((ev.get(k) - cv.get(k)).norm() ** 2) for k in ev.keys())
    den = sum(float(ev.get(k).norm() ** 2) for k in ev.keys())
    assert (num / den) ** 0.5 <= 1e-5  # 3 AdamW steps magnify rounding where a gradient entry is near 0


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_inductor_step_equals_eager(mode):
    """The same with inductor's generated C++ (slow to build on a small CPU): fusion reorders the model's float
    sums, so the whole gradient agrees to 1e-5; the penalty's value and gradient still to 1e-6."""
    tuned, reg, step, x, y = build(mode, "visual-linear", "squared")
    params = tuned.trainable_parameters()
    compiled = torch.compile(step, dynamic=False)
    e_task, e_pen = step(x, y)
    e_total = grads(params, e_task + 0.3 * e_pen)
    e_pen_grad = grads(params, step(x, y)[1])
    c_task, c_pen = compiled(x, y)
    c_total = grads(params, c_task + 0.3 * c_pen)
    c_pen_grad = grads(params, compiled(x, y)[1])
    assert abs(c_pen.item() - e_pen.item()) <= REL * abs(e_pen.item())
    assert rel(c_pen_grad, e_pen_grad) <= REL
    assert abs(c_task.item() - e_task.item()) <= 1e-5 * abs(e_task.item())
    assert rel(c_total, e_total) <= 1e-5
