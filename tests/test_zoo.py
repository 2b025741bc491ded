"""Compaction on torchvision classifiers no one here wrote: 30% of the channel and depth groups zeroed, then cut.

weights=None and random BatchNorm statistics (eval mode), small inputs: the test is about exactness
of the dependency tracing, not about accuracy. Each model must trace with ``strict=True`` (every
channel followed) unless it is listed in PARTIAL with the operation that stops the tracer.
"""

from __future__ import annotations

import pytest
import torch
from nets import randomize_bn

from torchslim import UnsupportedOperation, compact, structures, verify
from torchslim.deploy.profile import profile
from torchslim.layers import PaddedLayerNorm

torchvision = pytest.importorskip("torchvision")

REQUIRED = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "densenet121", "alexnet"]
MORE = ["mobilenet_v3_small", "efficientnet_b0", "googlenet", "squeezenet1_0", "mnasnet0_5",
        "shufflenet_v2_x0_5", "regnet_x_400mf", "resnext50_32x4d", "convnext_tiny"]
# models whose channels are only partly removable, and the operation that stops the tracer
PARTIAL: dict[str, str] = {}


def _input(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name", REQUIRED + MORE)
def test_torchvision_model_compacts_exactly(name, one_thread):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.get_model(name, weights=None)).eval()
    x = _input(name)
    if name in PARTIAL:
        with pytest.raises(UnsupportedOperation, match=PARTIAL[name]):
            structures(model, x, kinds=("channel", "neuron"), strict=True)
    groups = structures(model, x, kinds=("channel", "neuron", "depth"), strict=name not in PARTIAL)
    assert groups
    gen = torch.Generator().manual_seed(0)
    for i in torch.randperm(len(groups), generator=gen)[: int(0.3 * len(groups))]:
        groups[i].zero_()
    small = compact(model, x)
    report = verify(model, small, torch.randn(2, 3, 64, 64), atol=1e-4)
    assert report.ok, report
    dense, thin = profile(model, x[:1], latency=False), profile(small, x[:1], latency=False)
    assert thin.params < dense.params and thin.macs < dense.macs
    assert all(type(m).__module__.startswith(("torch.nn", "torchvision")) or isinstance(m, PaddedLayerNorm)
               for m in small.modules()), "the compact model is made of standard layers (a cut LayerNorm is padded)"
