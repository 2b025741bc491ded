"""lowrank(): layers factored into two (Force Regularization's low-rank step), rank groups, save/load."""

from __future__ import annotations

import warnings

import pytest
import torch
from nets import MLP
from torch import Tensor, nn

from torchslim.deploy.serialize import export_onnx, load_compact, save_compact
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.regularize.lasso import GroupLasso
from torchslim.structure.tracing import structures
from torchslim.surgery.compact import compact, verify
from torchslim.surgery.lowrank import LowRank, lowrank

pytestmark = pytest.mark.usefixtures("one_thread")


def _rank_weight(n: int, d: int, r: int, gen: torch.Generator) -> Tensor:
    """A random ``(n, d)`` matrix of rank exactly ``r``."""
    return torch.randn(n, r, generator=gen) @ torch.randn(r, d, generator=gen)


@torch.no_grad()
def _set_ranks(layer: nn.Conv2d | nn.Linear, ranks: list[int], seed: int = 0) -> nn.Module:
    """Give each group of ``layer`` a weight block of the given rank."""
    gen = torch.Generator().manual_seed(seed)
    n = layer.weight.shape[0] // len(ranks)
    blocks = [_rank_weight(n, layer.weight[0].numel(), r, gen) for r in ranks]
    layer.weight.copy_(torch.cat(blocks).view_as(layer.weight))
    return layer


@torch.no_grad()
def _truncate_(layer: nn.Conv2d | nn.Linear, r: int) -> None:
    """Replace the weight by its best rank-``r`` approximation (what Force Regularization approaches)."""
    u, s, vh = torch.linalg.svd(layer.weight.flatten(1), full_matrices=False)
    layer.weight.copy_((u[:, :r] * s[:r] @ vh[:r]).view_as(layer.weight))


def _close(a: Tensor, b: Tensor, rel: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


EXACT = {  # layer, group ranks, input shape
    "conv": (lambda: nn.Conv2d(6, 16, 3, stride=2, padding=1, dilation=2), [3], (2, 6, 11, 11)),
    "grouped": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2), [2, 3], (2, 8, 7, 7)),
    "linear": (lambda: nn.Linear(40, 30), [3], (5, 40)),
}


@pytest.mark.parametrize("method", ["pca", "svd"])
@pytest.mark.parametrize("case", list(EXACT))
def test_exact_rank_is_found_and_function_kept(case, method):
    make, group_ranks, shape = EXACT[case]
    model = nn.Sequential(_set_ranks(make(), group_ranks)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(shape)
    result = lowrank(model, x, energy=0.999, method=method)
    (row,) = result.layers
    assert row.rank == max(group_ranks) and row.energy >= 0.999 and row.error < 1e-5
    assert row.macs_after < row.macs_before
    assert isinstance(result.model[0], LowRank) and result.model[0].rank == 3
    _close(result.model(x), model(x))
    assert type(model[0]) is not LowRank and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_energy_picks_monotone_ranks_and_leaves_unprofitable_layers():
    model = MLP().eval()  # 64 -> 40 -> 30 -> 5
    for layer, r in [(model.net[1], 6), (model.net[3], 5)]:
        _truncate_(layer, r)
        with torch.no_grad():
            layer.weight.add_(1e-3 * torch.randn_like(layer.weight))  # a tail of small components
    x = torch.randn(8, 64)
    previous = {}
    for energy in (0.3, 0.6, 0.9, 0.99):
        result = lowrank(model, x, energy=energy)
        rows = {r.name: r for r in result.layers}
        for name in ("net.1", "net.3"):
            row = rows[name]
            assert row.energy >= energy and row.macs_after < row.macs_before
            assert row.rank >= previous.get(name, 1)
            previous[name] = row.rank
        last = rows["net.5"]  # 30 -> 5 saves only at r <= 4: r·(30 + 5) < 5·30
        if not last.decomposed:
            assert last.note.startswith("no saving") and type(result.model.net[5]) is nn.Linear
            assert last.rank > 4 and last.energy >= energy          # the rank asked for is still reported
    assert previous["net.1"] == 6 and previous["net.3"] == 5  # at 0.99 the tail is left out
    assert "net.1" in result.format()


@pytest.mark.parametrize("method", ["pca", "svd"])
def test_full_rank_reproduces_the_function(method):
    model = create_model("lenet").eval()
    x = torch.randn(2, 1, 28, 28)
    result = lowrank(model, x, energy=1.0, method=method, require_saving=False)
    assert all(isinstance(result.model.get_submodule(n), LowRank) for n in ("conv1", "conv2", "fc1", "fc2"))
    assert all(r.rank == min(r.out, r.fan_in) and r.error < 1e-5 for r in result.layers)
    _close(result.model(x), model(x))


def test_pca_and_svd_rank_rules_on_known_singular_values():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 8, generator=gen, dtype=torch.float64))
    sigma = torch.tensor([4.0, 2, 1, 1, 0, 0, 0, 0], dtype=torch.float64)  # σ²: 16, 4, 1, 1 of 22
    model = nn.Sequential(nn.Linear(40, 8))
    with torch.no_grad():
        model[0].weight.copy_(u * sigma @ v.T)
    x = torch.randn(3, 40)
    pca, svd = (lowrank(model, x, energy=0.95, method=m) for m in ("pca", "svd"))
    assert pca.layers[0].rank == 3 and pca.layers[0].energy == pytest.approx(21 / 22)  # 20/22 < 0.95
    assert svd.layers[0].rank == 2 and svd.layers[0].energy == pytest.approx((20 / 22) ** 0.5)
    same = lowrank(model, x, ranks={"0": 3}, method="svd")  # same r: same function, another split
    _close(same.model(x), pca.model(x))


def test_decompose_after_compact():
    model = create_model("lenet").eval()
    for layer, r in [(model.conv2, 10), (model.fc1, 12)]:
        _truncate_(layer, r)
    x = torch.randn(4, 1, 28, 28)
    for g in structures(model, x, kinds=("channel",))[::3]:
        g.zero_()
    small = compact(model, x)
    result = lowrank(small, x, energy=0.9999)
    rows = {r.name: r for r in result.layers}
    assert rows["conv2"].rank <= 10 and rows["fc1"].rank <= 12
    assert rows["conv2"].fan_in == small.conv2.in_channels * 25 < 20 * 25
    _close(result.model(x), small(x), rel=1e-4)


def test_decomposed_model_trains():
    model = lowrank(MLP(), ranks={"net.1": 8, "net.3": 6}).model.train()
    x, y = torch.randn(32, 64), torch.randint(0, 5, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(p.grad is not None for p in model.parameters())


def test_rank_groups_are_removed_by_compact():
    model = create_model("lenet").eval()
    x = torch.randn(4, 1, 28, 28)
    decomposed = lowrank(model, x, ranks={"conv2": 8, "fc1": 6}).model
    groups = structures(decomposed, x, kinds=("rank",))
    per_layer = {}
    for g in groups:
        per_layer[g.family.label] = per_layer.get(g.family.label, 0) + 1
    assert per_layer == {"conv2.0": 8, "fc1.0": 6} and {g.kind for g in groups} == {"rank"}
    assert not [g for g in structures(decomposed, x) if g.family.label in per_layer]  # not channels too
    lasso = GroupLasso(groups, 1e-2)
    norms = torch.stack([g.norm() for g in groups])
    lasso.prox_(0.1)
    assert (torch.stack([g.norm() for g in groups]) < norms).all()
    conv2 = [g for g in groups if g.family.label == "conv2.0"]
    conv2[1].zero_(), conv2[5].zero_()
    small = compact(decomposed, x)
    assert small.conv2.rank == 6 and small.conv2[0].out_channels == 6 and small.fc1.rank == 6
    assert verify(decomposed, small, x).ok


def test_save_and_load_round_trip(tmp_path):
    model = create_model("lenet").eval()
    x = torch.randn(2, 1, 28, 28)
    decomposed = lowrank(model, ranks={"conv2": 8, "fc1": 16}).model
    save_compact(decomposed, tmp_path / "lr.pt")
    back = load_compact(tmp_path / "lr.pt")
    assert type(back.conv2) is LowRank and back.fc1.rank == 16
    torch.testing.assert_close(back(x), decomposed(x), rtol=0, atol=0)
    assert structures(back, x, kinds=("rank",))  # still rank groups


def test_export_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    decomposed = lowrank(create_model("lenet").eval(), ranks={"conv2": 8, "fc1": 16}).model
    assert export_onnx(decomposed, torch.randn(2, 1, 28, 28), tmp_path / "lr.onnx") < 1e-4


def test_ranks_with_energy_for_the_other_layers():
    model = MLP()
    _truncate_(model.net[1], 4)
    rows = {r.name: r for r in lowrank(model, energy=0.999, ranks={"net.3": 2}).layers}
    assert rows["net.1"].rank == 4 and rows["net.3"].rank == 2
    assert lowrank(model, ranks={"net.3": 2}).layers[0].note == "no rank given"


def test_skip_layers_and_rows_without_inputs():
    result = lowrank(MLP(), energy=0.5, exclude=("net.1",), include=("net.1", "net.3"))
    assert [r.name for r in result.layers] == ["net.1", "net.3"]
    assert result.layers[0].note == "skipped" and type(result.model.net[1]) is nn.Linear
    assert result.layers[1].error is None and result.layers[1].macs_before is None


def test_include_and_exclude_take_globs():
    result = lowrank(MLP(), energy=0.5, include=["net.[13]"], exclude=["*.3"])
    assert [(r.name, r.note) for r in result.layers] == [("net.1", ""), ("net.3", "skipped")]
    assert type(result.model.net[1]) is LowRank and type(result.model.net[3]) is nn.Linear


def test_old_keywords_warn_and_do_the_same_as_include_and_exclude():
    new = lowrank(MLP(), energy=0.5, exclude=("net.1",), include=("net.1", "net.3"))
    with pytest.warns(DeprecationWarning, match=r"lowrank\(skip=...\) is deprecated.*use exclude="):
        old = lowrank(MLP(), energy=0.5, skip=("net.1",), include=("net.1", "net.3"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both = lowrank(MLP(), energy=0.5, skip=("net.1",), layers=("net.1", "net.3"))
    assert sorted(str(w.message).split("(")[1].split("=")[0] for w in caught) == ["layers", "skip"]
    assert all(w.category is DeprecationWarning for w in caught)
    assert [(r.name, r.note, r.rank) for r in old.layers] == [(r.name, r.note, r.rank) for r in new.layers]
    assert [(r.name, r.note, r.rank) for r in both.layers] == [(r.name, r.note, r.rank) for r in new.layers]
    with pytest.raises(TypeError, match="both 'skip' and its new name 'exclude'"):
        lowrank(MLP(), skip=("net.1",), exclude=("net.3",))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "kmeans"}, "method must be 'pca'"),
    ({"energy": 0.0}, "energy must be a fraction in \\(0, 1\\]"),
    ({"energy": 1.5}, "energy must be a fraction"),
    ({"ranks": {"net.1": 0}}, "must be an integer >= 1"),
    ({"ranks": {"net.1": 41}}, "exceeds min"),
    ({"ranks": {"net.3": 30}}, "saves no multiply-adds.*require_saving=False"),
    ({"ranks": {"net.7": 3}}, "did you mean 'net.5'"),
    ({"exclude": ("net.2",)}, "exclude pattern 'net.2' matches no layer"),
    ({"include": ("fc",)}, "include pattern 'fc' matches no layer"),
    ({"include": ("net.*9",)}, "include pattern 'net.\\*9'"),
    ({"include": "net.1"}, "must be a sequence of names"),
    ({"ranks": {"net.3": 2}, "exclude": ("net.3",)}, "both in ranks and excluded"),
])
def test_bad_arguments_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        lowrank(MLP(), **kwargs)


def test_model_without_layers_to_decompose():
    with pytest.raises(ConfigError, match="no layer to decompose"):
        lowrank(nn.Sequential(nn.ReLU(), nn.Linear(4, 1)))
