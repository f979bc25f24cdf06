"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files (no download)."""
from __future__ import annotations

import gzip
import os
import struct

FASHION_MNIST_DIR = os.environ.get("HVD_LB_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}: "
        "apt-get install dataset-fashion-mnist (or set HVD_LB_FASHION_MNIST)")


def read_idx(path: str):
    """An IDX file (optionally gzipped) as a NumPy array (LeCun's MNIST format)."""
    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"invalid IDX file {path}: expected unsigned-byte data")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"invalid IDX file {path}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def fashion_mnist_available(directory: str = None) -> bool:
    try:
        for stems in _FILES.values():
            for stem in stems:
                _find(directory or FASHION_MNIST_DIR, stem)
        return True
    except FileNotFoundError:
        return False


def fashion_mnist_size(split: str = "train", directory: str = None) -> int:
    """Number of images in ``split``, from the label file's header (nothing loaded)."""
    if split not in _FILES:
        raise ValueError(f"invalid split={split!r}: must be 'train' or 'test'")
    path = _find(directory or FASHION_MNIST_DIR, _FILES[split][1])
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(8)
    return struct.unpack(">I", head[4:8])[0]


def load_fashion_mnist(split: str = "train", directory: str = None):
    """(images float32 in [0, 1] of shape (N, 28, 28), labels int64)."""
    if split not in _FILES:
        raise ValueError(f"invalid split={split!r}: must be 'train' or 'test'")
    import numpy as np

    img_stem, lbl_stem = _FILES[split]
    d = directory or FASHION_MNIST_DIR
    x = read_idx(_find(d, img_stem)).astype(np.float32) / 255.0
    y = read_idx(_find(d, lbl_stem)).astype(np.int64)
    return x, y
