"""The structure and history pictures: what they count, and that every bar and colour can be read."""

from __future__ import annotations

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.train.plots import _ZERO_COLOR, _structure_figure, layer_zeros, plot_history, plot_structure


def _sparse_lenet():
    model = create_model("lenet")
    with torch.no_grad():
        model.conv1.weight[5:].zero_()  # 15 of 20 filters
        model.conv1.weight[0, 0, 0, 0] = 0.0  # one exact zero inside a remaining kernel
        model.conv2.weight[:, :10].zero_()  # 10 of 20 input channels, so 250 of 500 shape fibers
        model.conv2.weight[:, :, 0, :].zero_()  # plus the top kernel row: 50 more fibers
    return model


def test_structure_counts_zero_filters_channels_and_shapes(tmp_path):
    zeros = {z.name: z for z in layer_zeros(_sparse_lenet())}
    assert zeros["conv1"].filters == pytest.approx(0.75) and zeros["conv1"].channels == 0
    assert zeros["conv2"].channels == pytest.approx(0.5) and zeros["conv2"].shapes == pytest.approx(0.6)
    assert zeros["fc1"].shapes is None
    assert plot_structure(_sparse_lenet(), tmp_path / "s.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="empty"):
        plot_history([], tmp_path / "h.png")


def test_every_bar_is_labelled_and_not_applicable_differs_from_zero():
    fig = _structure_figure(_sparse_lenet(), None, None)
    bars = fig.axes[0]
    labels = [t.get_text() for t in bars.texts]
    assert len(labels) == 3 * 4  # three kinds for each of LeNet's four layers
    assert labels.count("n/a") == 2  # shape fibers of fc1 and fc2
    assert labels[:3] == ["75", "0", "0"]  # conv1: filters, channels (none zero), shapes (none zero)


def test_kernels_share_one_symmetric_scale_with_a_colour_bar_and_zeros_apart():
    model = _sparse_lenet()
    fig = _structure_figure(model, None, None)
    kernels = fig.axes[1]
    weights = [im for im in kernels.images if im.get_cmap().name == "RdBu_r"]
    assert len(weights) == 1  # one image for all kernels: one scale
    assert weights[0].get_clim() == pytest.approx((-float(model.conv1.weight.detach().abs().max()),
                                                   float(model.conv1.weight.detach().abs().max())))
    assert weights[0].colorbar is not None
    zero_layers = [im for im in kernels.images if im.get_cmap().N == 1]
    assert zero_layers and zero_layers[0].get_array().count() == 1  # the one exact zero, drawn in its own colour
    assert [p for p in kernels.patches if p.get_facecolor()[:3] == pytest.approx(
        tuple(int(_ZERO_COLOR[i:i + 2], 16) / 255 for i in (1, 3, 5)))]  # and its key
