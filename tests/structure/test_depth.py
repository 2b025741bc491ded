"""Depth groups: a residual branch as one group; a zero branch turns its block into the shortcut."""

from __future__ import annotations

import pytest
import torch
from nets import randomize_bn
from support import needs_fashion_mnist
from torch import nn

from torchslim import compact, structures, verify
from torchslim.deploy.serialize import load_compact, save_compact
from torchslim.models import create_model
from torchslim.train.engine import run
from torchslim.train.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet20():
    torch.manual_seed(0)
    return randomize_bn(create_model("resnet20")).eval(), torch.randn(2, 1, 28, 28)


def _depth(model, x):
    return {g.family.label: g for g in structures(model, x, kinds=("depth",))}


def test_every_block_of_resnet20_is_a_depth_group():
    model, x = _resnet20()
    groups = _depth(model, x)
    assert sorted(groups) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    block = model.layer2[1]
    assert groups["layer2.1"].numel() == sum(p.numel() for n, p in block.named_parameters()
                                             if not n.startswith("shortcut"))


def test_zero_branch_becomes_the_shortcut_exactly(tmp_path):
    model, x = _resnet20()
    groups = _depth(model, x)
    groups["layer1.1"].zero_()
    groups["layer2.0"].zero_()                                 # a projection block: conv 1x1 + BN shortcut
    small = compact(model, x)
    assert isinstance(small.layer1[1], nn.Sequential) and [type(m) for m in small.layer1[1]] == [nn.ReLU]
    assert [type(m) for m in small.layer2[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert verify(model, small, torch.randn(3, 1, 28, 28)).ok
    removed = sum(p.numel() for n, p in model.named_parameters()
                  if n.startswith(("layer1.1.", "layer2.0.conv", "layer2.0.bn")))
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters()) - removed
    save_compact(small, tmp_path / "small.pt", arch={"name": "resnet20", "kwargs": {}})
    torch.testing.assert_close(load_compact(tmp_path / "small.pt")(x), small(x))


def test_a_branch_that_is_not_zero_stays():
    model, x = _resnet20()
    g = _depth(model, x)["layer3.2"].zero_()
    with torch.no_grad():
        model.layer3[2].bn2.bias[0] = 1.0                      # the branch now adds a constant
    assert not g.is_zero()
    small = compact(model, x)
    assert type(small.layer3[2]) is type(model.layer3[2])


class _TwoAdds(nn.Module):
    """``x + a(x) + b(x)`` in one module: which branch would the block become? No depth group."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.a(x) + self.b(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 4, 1), _TwoAdds(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_blocks_that_are_not_a_plain_residual_give_no_depth_group():
    assert _depth(_Net(), torch.randn(1, 3, 8, 8)) == {}


@needs_fashion_mnist
def test_depth_ssl_end_to_end_removes_blocks(tmp_path):
    recipe = load_recipe("resnet20_depth", overrides=[
        "data.train_limit=256", "data.test_limit=128", "data.valid_size=0", "batch_size=64",
        "baseline.epochs=1", "ssl.epochs=1", "ssl.lr=0.05", "ssl.lr_schedule=constant", "ssl.strength={depth: 50.0}",
        "finetune.epochs=1"])
    result = run(recipe, run_dir=tmp_path, progress=False)
    blocks = [m for m in result.compact_model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) < 9, "a strong depth λ should have zeroed some branches"
    assert result.accuracy["compact"] == pytest.approx(result.accuracy["ssl"], abs=1 / 128)


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def test_convnext_layer_scale_is_part_of_the_depth_group():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = _depth(model, x)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "CNBlock"]
    assert sorted(groups) == sorted(blocks) and len(blocks) == 18
    block = model.features[3][1]
    group = groups["features.3.1"]
    assert "features.3.1.layer_scale" in {s.param for s in group.family.stripes}
    assert group.numel() == sum(p.numel() for p in block.parameters())
    groups["features.1.2"].zero_()
    group.zero_()
    assert not block.layer_scale.any() and group.is_zero()
    small = compact(model, x)
    assert isinstance(small.features[1][2], nn.Identity) and isinstance(small.features[3][1], nn.Identity)
    assert type(small.features[3][0]) is type(block)
    assert _numel(small) == _numel(model) - _numel(model.features[1][2]) - _numel(block)
    assert verify(model, small, torch.randn(2, 3, 64, 64), atol=1e-5).ok


def test_only_a_zero_layer_scale_is_not_a_zero_branch():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = _depth(model, x)
    groups["features.7.2"].zero_()
    with torch.no_grad():
        model.features[7][2].layer_scale[5] = 0.5               # the branch scales a non-zero value again
    small = compact(model, x)
    assert type(small.features[7][2]) is type(model.features[7][2])


class _Scaled(nn.Module):
    """``x + gamma * f(x)`` with ``gamma`` a bare per-channel (or scalar) parameter of the block."""

    def __init__(self, shape=(4, 1, 1), twice=False, post=False):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.gamma = nn.Parameter(torch.full(shape, 0.3))
        self.twice, self.post = twice, post

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        if self.twice:                                           # gamma used twice: not a plain scale
            y = self.gamma * y
        y = x + self.gamma * y
        return torch.relu(y) if self.post else y


class _ScaledNet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 4, 1), _Scaled(**kw), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), ()])
def test_a_bare_scale_parameter_joins_the_branch(shape):
    torch.manual_seed(0)
    model, x = randomize_bn(_ScaledNet(shape=shape, post=True)).eval(), torch.randn(2, 3, 8, 8)
    groups = _depth(model, x)
    assert list(groups) == ["block"]
    g = groups["block"]
    assert "block.gamma" in {s.param for s in g.family.stripes}
    assert g.numel() == sum(p.numel() for p in model.block.parameters())
    g.zero_()
    assert not model.block.gamma.any() and g.is_zero()
    small = compact(model, x)
    assert [type(m) for m in small.block] == [nn.ReLU]
    assert _numel(small) == _numel(model) - _numel(model.block)
    assert verify(model, small, torch.randn(3, 3, 8, 8)).ok


def test_a_shared_or_broadcasting_scale_gives_no_depth_group():
    x = torch.randn(1, 3, 8, 8)
    assert _depth(_ScaledNet(twice=True), x) == {}
    assert _depth(_ScaledNet(shape=(2, 4, 1, 1)), x) == {}       # gamma would broadcast the branch: not a scale
    net = nn.Sequential(nn.Conv2d(3, 4, 1), _Scaled(), _Scaled())
    net[2].gamma = net[1].gamma                                  # one scale shared by two blocks
    assert _depth(net, x) == {}
    net[2].gamma = nn.Parameter(torch.ones(4, 1, 1))
    assert sorted(_depth(net, x)) == ["1", "2"]
