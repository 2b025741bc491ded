"""The README's Python quick start runs as written (with a tiny stand-in for the user's loader)."""

import re
from pathlib import Path

import torch

README = Path(__file__).parent.parent / "README.md"


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    block = re.search(r"## Quick start \(Python\)\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    loader = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    namespace = {"loader": loader}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "lenet_small.onnx").exists()
    assert namespace["small"](torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_readme_force_and_lowrank_block_runs():
    import torchslim
    from torchslim.models import create_model

    block = re.search(r"Force regularization and low rank \(Wen et al., ICCV 2017\):\n\n```python\n(.*?)```",
                      README.read_text(), re.S).group(1)
    model, x = create_model("lenet"), torch.randn(4, 1, 28, 28)
    namespace = {"torchslim": torchslim, "model": model, "x": x}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["thin"](x).shape == (4, 10) and namespace["force"].layers
