import torch
from nets import TinyLeNet
from torch import nn

from torchslim import ZeroMask, structures


def test_fine_tuning_keeps_removed_groups_at_zero_despite_momentum():
    net = TinyLeNet()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):  # build up momentum everywhere
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    groups = structures(net, x, kinds=("channel", "shape"))
    for i in (0, 3, 7, 40, 70):  # 70: conv2's fiber (c=1, i=1, j=1)
        groups[i].zero_()  # conv1 channels also zero whole input channels of conv2's shape groups
    dead = [g for g in groups if g.is_zero()]
    mask = ZeroMask(groups).attach()
    assert mask.num_frozen == len(dead) > 5
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        mask.apply_(opt)
    assert all(g.is_zero() for g in dead)
    assert sum(g.is_zero() for g in groups) == len(dead)  # nothing else was frozen
    mask.detach()
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    assert net.conv2.weight.grad[:, 1, 1, 1].abs().sum() > 0  # hooks are gone
