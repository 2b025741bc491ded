import torch
from nets import TinyLeNet

from torchslim import structures
from torchslim.structure.report import sparsity_report


def test_report_counts_live_structures_and_macs():
    net = TinyLeNet()
    x = torch.randn(2, 1, 28, 28)
    groups = structures(net, x, kinds=("channel", "shape"))
    with torch.no_grad():
        net.conv1.weight[:, :, 0, :] = 0  # 5 of 25 fibers
    for g in [g for g in groups if g.name in ("conv2:channel[0]", "conv2:channel[1]")]:
        g.zero_()
    rep = sparsity_report(net, x, groups)
    conv1, conv2, fc1 = rep.layers[:3]
    assert (conv1.shape_alive, conv1.shape_total) == (20, 25)
    assert conv1.macs_dense == 6 * 25 * 24 * 24 and conv1.macs_sparse == 6 * 20 * 24 * 24
    assert (conv2.filters_alive, conv2.filters_total) == (6, 8)
    assert (fc1.channels_alive, fc1.channels_total) == (6 * 16, 8 * 16)
    assert rep.groups["channel"] == (2, 14) and rep.groups["shape"][0] == 5
    assert "conv2" in rep.format() and rep.macs_sparse < rep.macs_dense
