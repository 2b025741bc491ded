"""idx loading, folder search, error messages and the minibatch iterator, on tiny synthetic files."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from torchslim.data import batches, fashion_mnist, load_dataset, load_idx, mnist
from torchslim.errors import ConfigError, DatasetNotFound, ShapeMismatch

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(values: torch.Tensor) -> bytes:
    """Encode a uint8 tensor as an idx file: ``00 00 08 ndim``, big-endian dims, data."""
    header = bytes([0, 0, 0x08, values.dim()])
    header += b"".join(int(d).to_bytes(4, "big") for d in values.shape)
    return header + values.contiguous().numpy().tobytes()


def _write_idx(path: Path, values: torch.Tensor, gz: bool) -> Path:
    data = _idx_bytes(values)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _random_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
    return images, labels


def _write_split(folder: Path, stem: str, n: int, gz: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _random_split(n, seed)
    _write_idx(folder / f"{stem}-images-idx3-ubyte", images, gz)
    _write_idx(folder / f"{stem}-labels-idx1-ubyte", labels, gz)
    return images, labels


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHSLIM_DATA", raising=False)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 3, 4, 5)])
def test_load_idx_round_trip(tmp_path: Path, gz: bool, shape: tuple[int, ...]) -> None:
    values = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    path = _write_idx(tmp_path / "x-idx", values, gz)
    loaded = load_idx(path)
    assert loaded.dtype == torch.uint8
    assert torch.equal(loaded, values)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_normalizes_and_converts(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_split(tmp_path, "t10k", n=6, gz=gz)
    ds = fashion_mnist("test", tmp_path)
    assert ds.images.shape == (6, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (6,) and ds.labels.dtype == torch.int64
    expected = (images.float().unsqueeze(1) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(ds.images, expected)
    assert torch.equal(ds.labels, labels.long())
    image, label = ds[2]                                    # TensorDataset indexing
    assert torch.equal(image, ds.images[2]) and int(label) == int(labels[2])


def test_limit_keeps_the_first_examples(tmp_path: Path) -> None:
    _, labels = _write_split(tmp_path, "train", n=10, gz=True)
    ds = fashion_mnist("train", tmp_path, limit=4)
    assert len(ds) == 4
    assert torch.equal(ds.labels, labels[:4].long())
    with pytest.raises(ConfigError, match="limit"):
        fashion_mnist("train", tmp_path, limit=0)


def test_mnist_uses_its_own_constants_and_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, _ = _write_split(tmp_path / "MNIST" / "raw", "train", n=3, gz=False)   # torchvision's layout
    monkeypatch.setenv("TORCHSLIM_DATA", str(tmp_path))
    ds = mnist("train")
    torch.testing.assert_close(ds.images, (images.float().unsqueeze(1) / 255 - 0.1307) / 0.3081)
    assert ds.root == tmp_path / "MNIST" / "raw"


def test_load_dataset_dispatches_by_name(tmp_path: Path) -> None:
    _write_split(tmp_path / "fashion-mnist", "t10k", n=2, gz=True)
    assert load_dataset("fashion-mnist", "test", tmp_path).name == "fashion-mnist"
    with pytest.raises(ConfigError, match="fashion-mnist, mnist"):
        load_dataset("cifar10", "test", tmp_path)
    with pytest.raises(ConfigError, match="'train' or 'test'"):
        load_dataset("fashion-mnist", "val", tmp_path)


def test_missing_folder_says_where_it_looked_and_how_to_get_the_data(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFound) as info:
        fashion_mnist("test", missing)
    message = str(info.value)
    assert str(missing) in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "TORCHSLIM_DATA" in message and "--data-dir" in message and "download=True" in message


def test_explicit_data_dir_never_falls_back_to_the_system_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="only place searched"):
        fashion_mnist("test", tmp_path)


def test_mnist_without_a_folder_asks_for_one() -> None:
    with pytest.raises(DatasetNotFound, match="TORCHSLIM_DATA.*not set"):
        mnist("test")


def _corrupt_variants(good: bytes) -> dict[str, bytes]:
    return {
        "bad magic": b"\x12\x34" + good[2:],
        "bad type": good[:2] + b"\x0d" + good[3:],
        "truncated": good[:-5],
        "trailing bytes": good + b"\x00",
        "too short": good[:3],
        "truncated gzip": gzip.compress(good)[:-20],
    }


@pytest.mark.parametrize("variant", list(_corrupt_variants(b"")))
def test_corrupt_idx_file_is_named_in_the_error(tmp_path: Path, variant: str) -> None:
    images, labels = _random_split(4, seed=2)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(_corrupt_variants(_idx_bytes(images))[variant])
    with pytest.raises(DatasetNotFound, match="corrupt") as info:
        fashion_mnist("test", tmp_path)
    assert str(bad) in str(info.value)


def test_images_and_labels_of_different_lengths(tmp_path: Path) -> None:
    images, _ = _random_split(4, seed=3)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.zeros(3, dtype=torch.uint8), gz=False)
    with pytest.raises(DatasetNotFound, match="do not fit together"):
        fashion_mnist("test", tmp_path)


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split() -> None:
    ds = fashion_mnist("test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert torch.equal(ds.labels.bincount(), torch.full((10,), 1000))   # Fashion-MNIST is balanced
    assert abs(float(ds.images.mean())) < 0.05 and abs(float(ds.images.std()) - 1) < 0.05


def test_batches_are_deterministic_with_a_seeded_generator() -> None:
    images, labels = torch.arange(10.0).view(10, 1), torch.arange(10)

    def epoch(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [y for _, y in batches(images, labels, 4, shuffle=True, generator=gen)]

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert [len(y) for y in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))        # every example once
    for x, y in batches(images, labels, 4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(x.view(-1).long(), y)                        # pairs stay together


def test_batches_in_order_and_drop_last() -> None:
    images, labels = torch.arange(10.0).view(10, 1), torch.arange(10)
    ordered = [y.tolist() for _, y in batches(images, labels, 4, shuffle=False)]
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = [len(y) for _, y in batches(images, labels, 4, shuffle=True, drop_last=True)]
    assert dropped == [4, 4]


def test_batches_reject_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        batches(torch.zeros(3, 1), torch.zeros(3), 0, shuffle=False)
    with pytest.raises(ShapeMismatch, match="3 images but 2 labels"):
        batches(torch.zeros(3, 1), torch.zeros(2), 2, shuffle=False)
