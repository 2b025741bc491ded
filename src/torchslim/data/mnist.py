"""MNIST and Fashion-MNIST from their idx files, loaded whole into tensors.

The idx format (LeCun's): a 4-byte magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the values in C order. Both datasets ship as four such files, gzipped or not::

    train-images-idx3-ubyte  (60000, 28, 28)    train-labels-idx1-ubyte  (60000,)
    t10k-images-idx3-ubyte   (10000, 28, 28)    t10k-labels-idx1-ubyte   (10000,)

A dataset folder is looked for in ``data_dir`` if given (and nowhere else), otherwise in
``$TORCHSLIM_DATA`` and then the dataset's system folder (Debian's ``dataset-fashion-mnist`` installs
Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``). Inside each root the files may lie in the root
itself, in ``<root>/<name>`` or in torchvision's layout ``<root>/<TorchvisionName>/raw``.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from torchslim.errors import ConfigError, DatasetNotFound, ShapeMismatch

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]
ENV_VAR = "TORCHSLIM_DATA"

_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_STEMS = {"train": "train", "test": "t10k"}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class _Spec:
    """What differs between the idx datasets: names, folders, normalization constants."""

    name: str                       # "fashion-mnist": the name load_dataset() dispatches on
    torchvision_name: str           # torchvision's download folder: <root>/<torchvision_name>/raw
    system_dir: Path | None         # a system-wide install, searched last
    mean: float                     # of the training pixels scaled to [0, 1]
    std: float
    install_hint: str               # how to get it, before the generic --data-dir advice


_FASHION_MNIST = _Spec(
    "fashion-mnist", "FashionMNIST", Path("/usr/share/datasets/fashion-mnist"), 0.2860, 0.3530,
    "`sudo apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist); or ",
)
_MNIST = _Spec("mnist", "MNIST", None, 0.1307, 0.3081, "")


class IdxDataset(TensorDataset):
    """An in-memory image classification set: ``images (N, C, H, W)`` float32, ``labels (N,)`` int64.

    A ``TensorDataset`` (so ``ds[i] == (image, label)`` and a DataLoader accepts it) that also names
    its tensors and remembers where it came from and how it was normalized.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, *, name: str, split: str, root: Path, mean: float, std: float
    ) -> None:
        super().__init__(images, labels)
        self.name, self.split, self.root = name, split, root
        self.mean, self.std = mean, std

    @property
    def images(self) -> Tensor:
        """Normalized images ``(N, C, H, W)``, float32."""
        return self.tensors[0]

    @property
    def labels(self) -> Tensor:
        """Class indices ``(N,)``, int64."""
        return self.tensors[1]

    @property
    def num_classes(self) -> int:
        """Number of classes, counted as ``max(label) + 1``."""
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __repr__(self) -> str:
        return f"IdxDataset(name={self.name!r}, split={self.split!r}, images={tuple(self.images.shape)})"


def load_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read one idx file of unsigned bytes, gzipped or not (told apart by content, not by name).

    Returns:
        uint8 tensor of the shape in the file's header, e.g. ``(60000, 28, 28)`` or ``(60000,)``.
    Raises:
        DatasetNotFound: the file is missing, is not idx (bad magic number), is not of unsigned
            bytes, or has a size that disagrees with its header (truncated or corrupt).
    """
    path = Path(path)
    data = _read_maybe_gzipped(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise _corrupt(path, f"bad magic number {bytes(data[:4]).hex(' ')!r} (expected '00 00 08 <ndim>')")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != _IDX_UBYTE:
        raise _corrupt(path, f"element type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupt(path, f"{len(data)} bytes, too short for the header of a {ndim}-d idx file")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise _corrupt(path, f"{len(data)} bytes but its header {shape} needs {expected} (truncated?)")
    return torch.frombuffer(data, dtype=torch.uint8, count=expected - header, offset=header).view(shape)


def fashion_mnist(
    split: Split, data_dir: str | os.PathLike[str] | None = None, *, limit: int | None = None
) -> IdxDataset:
    """Fashion-MNIST ``split`` normalized with mean 0.2860 and std 0.3530.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        data_dir: folder with the idx files; default ``$TORCHSLIM_DATA``, then
            ``/usr/share/datasets/fashion-mnist``.
        limit: keep only the first ``limit`` examples (for quick runs).
    Returns:
        dataset with ``images (N, 1, 28, 28)`` float32 and ``labels (N,)`` int64.
    Raises:
        DatasetNotFound: no folder has the files, or a file is corrupt.
        ConfigError: a bad ``split`` or ``limit``.
    """
    return _load(_FASHION_MNIST, split, data_dir, limit)


def mnist(
    split: Split, data_dir: str | os.PathLike[str] | None = None, *, limit: int | None = None
) -> IdxDataset:
    """MNIST ``split`` normalized with mean 0.1307 and std 0.3081 (see :func:`fashion_mnist`).

    MNIST has no system folder: pass ``data_dir`` or set ``$TORCHSLIM_DATA``.
    """
    return _load(_MNIST, split, data_dir, limit)


_LOADERS = {"fashion-mnist": fashion_mnist, "mnist": mnist}


def load_dataset(
    name: str, split: Split, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None
) -> IdxDataset:
    """The dataset called ``name`` (``"fashion-mnist"`` or ``"mnist"``); arguments as :func:`fashion_mnist`.

    Raises:
        ConfigError: an unknown ``name``; the message lists the valid ones.
    """
    if name not in _LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name](split, data_dir, limit=limit)


def batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """An iterator over ``(x, y)`` minibatches of in-memory tensors: one ``randperm``, then indexing.

    Arguments are checked, and the permutation drawn, when ``batches`` is called, not on the first batch.

    Args:
        images: ``(N, *)``; labels: ``(N, *)``.
        batch_size: examples per batch; the last batch is smaller unless ``drop_last``.
        shuffle: visit the examples in the order of ``torch.randperm(N, generator=generator)``;
            the same seeded generator state gives the same batches.
        generator: the random stream for shuffling (default: torch's global one).
    Returns:
        an iterator of ``x (B, *)``, ``y (B, *)`` with ``B = batch_size`` (except possibly the last).
    Raises:
        ConfigError: ``batch_size < 1``.
        ShapeMismatch: images and labels of different lengths.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if len(labels) != n:
        raise ShapeMismatch(f"{n} images but {len(labels)} labels; pass tensors of the same length")
    order = torch.randperm(n, generator=generator) if shuffle else None   # drawn now, not on first next()
    return _iterate(images, labels, batch_size, order, drop_last)


def _iterate(
    images: Tensor, labels: Tensor, batch_size: int, order: Tensor | None, drop_last: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    n = len(images)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield images[start:start + batch_size], labels[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield images.index_select(0, idx), labels.index_select(0, idx)


def _load(spec: _Spec, split: str, data_dir: str | os.PathLike[str] | None, limit: int | None) -> IdxDataset:
    if split not in _FILE_STEMS:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples or None, got {limit}")
    stem = _FILE_STEMS[split]
    names = (f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte")
    image_file, label_file = _find_files(spec, names, data_dir)
    folder = image_file.parent
    raw_images, raw_labels = load_idx(image_file), load_idx(label_file)
    _check_pair(folder, names, raw_images, raw_labels)
    if limit is not None:
        raw_images, raw_labels = raw_images[:limit], raw_labels[:limit]
    images = raw_images.unsqueeze(1).to(torch.float32)             # (N, 1, 28, 28), a fresh copy
    images.div_(255.0).sub_(spec.mean).div_(spec.std)
    logger.info("loaded %s %s: %d images from %s", spec.name, split, len(images), folder)
    return IdxDataset(
        images, raw_labels.to(torch.int64), name=spec.name, split=split, root=folder, mean=spec.mean, std=spec.std
    )


def _check_pair(folder: Path, names: tuple[str, str], images: Tensor, labels: Tensor) -> None:
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DatasetNotFound(
            f"idx files in {folder} do not fit together: {names[0]} has shape {tuple(images.shape)} "
            f"(expected (N, H, W)) and {names[1]} {tuple(labels.shape)} (expected (N,)); "
            "replace them with an intact copy of the dataset"
        )


def _roots(spec: _Spec, data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """The roots to search, in order, each with how it was chosen."""
    if data_dir is not None:
        return [(Path(data_dir).expanduser(), "data_dir argument")]
    roots = []
    if os.environ.get(ENV_VAR):
        roots.append((Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"))
    if spec.system_dir is not None:
        roots.append((spec.system_dir, "system folder"))
    return roots


def _candidates(spec: _Spec, root: Path) -> list[Path]:
    return [root, root / spec.name, root / spec.torchvision_name / "raw"]


def _find_files(
    spec: _Spec, names: tuple[str, str], data_dir: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """The image and label files of the first candidate folder that holds both."""
    looked: list[str] = []
    for root, why in _roots(spec, data_dir):
        for folder in _candidates(spec, root):
            images, labels = _file_in(folder, names[0]), _file_in(folder, names[1])
            if images is not None and labels is not None:
                return images, labels
            looked.append(f"{folder} ({why})")
    if data_dir is not None:
        looked.append(f"(an explicit data_dir is the only place searched: ${ENV_VAR} and system folders are not)")
    elif not os.environ.get(ENV_VAR):
        looked.append(f"${ENV_VAR} (not set)")
    raise DatasetNotFound(
        f"{spec.name}: found no folder with {names[0]}[.gz] and {names[1]}[.gz]. Looked in:\n  "
        + "\n  ".join(looked)
        + f"\nTo get it: {spec.install_hint}pass --data-dir (data_dir=) or set ${ENV_VAR} to a folder "
        "holding the idx files. For MNIST (or CIFAR) use torchvision's datasets with download=True yourself, "
        f"e.g. torchvision.datasets.{spec.torchvision_name}(root, download=True), and pass that root: "
        f"<root>/{spec.torchvision_name}/raw is searched too."
    )


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_maybe_gzipped(path: Path) -> bytearray:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetNotFound(f"idx file {path} does not exist") from exc
    except OSError as exc:
        raise DatasetNotFound(f"cannot read idx file {path}: {exc}; check its permissions") from exc
    if raw[:2] != _GZIP_MAGIC:
        return bytearray(raw)
    try:
        return bytearray(gzip.decompress(raw))
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"broken gzip stream ({exc})") from exc


def _corrupt(path: Path, what: str) -> DatasetNotFound:
    return DatasetNotFound(
        f"idx file {path} is corrupt: {what}. Delete it and get an intact copy "
        "(e.g. reinstall dataset-fashion-mnist, or download the dataset again)."
    )
