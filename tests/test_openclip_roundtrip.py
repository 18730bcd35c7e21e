"""Weights specs that name an open_clip model, and models written by `apply` that open_clip loads."""
import open_clip
import torch
from safetensors.torch import save_file

from tvtool import taskvector as tv
from tvtool.cli import main
from tvtool.models import load_clip


def test_extract_from_arch_spec_and_apply_loads_in_open_clip(tmp_path):
    base = load_clip("tvtool-mini").model.state_dict()
    g = torch.Generator().manual_seed(0)
    ft = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if k.startswith("visual.transformer") else v.clone())
          for k, v in base.items()}
    save_file({k: v.contiguous() for k, v in ft.items()}, tmp_path / "ft.safetensors")
    assert main(["extract", "--base", "tvtool-mini:builtin", "--finetuned", str(tmp_path / "ft.safetensors"),
                 "--task", "mini-shapes", "-o", str(tmp_path / "v.st")]) == 0
    v = tv.open_vector(tmp_path / "v.st")
    assert v.meta["base"]["model"] == "tvtool-mini"
    assert v.meta["base"]["fingerprint"] == load_clip("tvtool-mini").fingerprint
    assert main(["apply", str(tmp_path / "v.st"), "--base", "tvtool-mini", "--alpha", "0.5",
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    model = open_clip.create_model("tvtool-mini", pretrained=str(tmp_path / "m.safetensors"))
    got = model.state_dict()
    for k in base:
        if base[k].is_floating_point():
            torch.testing.assert_close(got[k], base[k] + 0.5 * (ft[k] - base[k]), rtol=0, atol=1e-6)


def test_models_command_lists_the_builtin(capsys):
    assert main(["models", "tvtool-mini"]) == 0
    out = capsys.readouterr().out
    assert "tvtool-mini" in out and "builtin" in out
