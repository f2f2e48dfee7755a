"""Real labelled data as WebDataset shards: Fashion-MNIST IDX reading and a shard writer.

The full Fashion-MNIST is used when its IDX files are found; otherwise the real subset
bundled in the package (MIT, (c) 2017 Zalando SE) keeps everything working offline.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from streamprune.errors import InputError, SettingsError
from streamprune.formats.classes import Classes

BUNDLED = Path(__file__).parent / "data" / "fashion-mnist-subset"
SHARED = Path("../shared/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES: dict[int, npt.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputError(f"{str(path)!r} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise InputError(f"{str(path)!r}: IDX body has {len(body)} bytes, header says {dims} of {dtype}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + array.tobytes())


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where the Fashion-MNIST files are: `data_dir`, `$STREAMPRUNE_FASHION_MNIST`,
    `../shared/datasets/fashion-mnist`, else the bundled subset."""
    candidates = [data_dir, os.environ.get("STREAMPRUNE_FASHION_MNIST"), SHARED]
    for c in candidates:
        if c and (Path(c) / (_FILES["train"][0] + ".gz")).exists():
            return Path(c)
        if c is data_dir and c is not None:
            raise FileNotFoundError(f"no Fashion-MNIST IDX files in {str(c)!r}")
    return BUNDLED


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images `(n, 28, 28)` uint8 and labels `(n,)` uint8 of a split ("train" or "test")."""
    if split not in _FILES:
        raise SettingsError(f"split must be 'train' or 'test', not {split!r}")
    d = fashion_mnist_dir(data_dir)
    images, labels = (read_idx(d / (name + ".gz")) for name in _FILES[split])
    return images, labels


def fashion_mnist_classes() -> Classes:
    """Fashion-MNIST's class list: its ten names, `CLASSES[i]` for the integer label `i` of its `cls` members."""
    return Classes(len(CLASSES), CLASSES, "cls")


def shard_sizes(n: int, n_shards: int, uneven: bool = False, seed: int = 0) -> list[int]:
    """Split `n` samples into `n_shards` sizes summing to `n`.

    `uneven` draws deliberately unequal sizes (roughly 1:8 between smallest and largest),
    as real shard sets have after filtering.
    """
    if n_shards < 1:
        raise SettingsError(f"n_shards must be >= 1, not {n_shards}")
    if not uneven:
        return [n // n_shards + (i < n % n_shards) for i in range(n_shards)]
    w = np.random.default_rng(seed).uniform(1.0, 8.0, n_shards)
    sizes = np.floor(w / w.sum() * n).astype(int)
    sizes[np.argsort(-w)[: n - sizes.sum()]] += 1
    return sizes.tolist()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 greyscale `(H, W)` or RGB `(H, W, 3)` image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_shards(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int | None = None,
    sizes: Sequence[int] | None = None,
    prefix: str = "train",
    image_format: str = "png",
    key_offset: int = 0,
    progress: bool = False,
) -> list[str]:
    """Write labelled arrays as WebDataset shards `{prefix}-{i:06d}.tar`; returns their paths.

    Each sample has key `{index:08d}`, an image member (`png`, or raw `npy`) and `cls`.
    Give `samples_per_shard` for even shards or `sizes` (e.g. from `shard_sizes`).
    """
    import webdataset as wds

    if len(images) != len(labels):
        raise SettingsError(f"{len(images)} images but {len(labels)} labels")
    if image_format not in ("png", "npy"):
        raise SettingsError(f"image_format must be 'png' or 'npy', not {image_format!r}")
    if sizes is None:
        per = samples_per_shard or 1000
        sizes = shard_sizes(len(images), max(1, -(-len(images) // per)))
    if sum(sizes) != len(images):
        raise SettingsError(f"shard sizes sum to {sum(sizes)}, not the {len(images)} samples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from streamprune.progress import progress_bar

    paths, start = [], 0
    for s, size in enumerate(progress_bar(sizes, desc="write shards", unit="shard", disable=not progress)):
        path = out_dir / f"{prefix}-{s:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp), mtime=0) as sink:
            for i in range(start, start + size):
                sample = {"__key__": f"{i + key_offset:08d}", "cls": int(labels[i])}
                if image_format == "png":
                    sample["png"] = encode_png(images[i])
                else:
                    buf = io.BytesIO()
                    np.save(buf, np.asarray(images[i]), allow_pickle=False)
                    sample["npy"] = buf.getvalue()
                sink.write(sample)
        os.replace(tmp, path)
        paths.append(str(path))
        start += size
    return paths


def weblike_sample(
    image: np.ndarray, label: int, key: str, rng: np.random.Generator, sizes: tuple[int, int] = (48, 96)
) -> dict:
    """A real greyscale image dressed as a web-scraped sample: resized to `sizes` px (48-96) with its
    aspect jittered, tinted, stored as JPEG (RGB, greyscale, CMYK or with an EXIF rotation) or PNG (RGBA,
    palette), with its label as a class name in a JSON member."""
    from PIL import Image

    w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
    grey = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    tint = rng.uniform(0.5, 1.0, size=3)
    rgb = Image.fromarray((np.asarray(grey, dtype=np.float32)[..., None] * tint).astype(np.uint8))
    kind = ("rgb", "rgb", "rgb", "grey", "cmyk", "exif", "rgba", "palette")[int(rng.integers(8))]
    buf = io.BytesIO()
    if kind == "grey":
        grey.save(buf, format="JPEG", quality=90)
    elif kind == "cmyk":
        rgb.convert("CMYK").save(buf, format="JPEG", quality=90)
    elif kind == "exif":  # stored turned a quarter, with the EXIF tag that turns it back
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=90, exif=exif)
    elif kind == "rgba":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.where(np.asarray(grey) > 0, 255, 0).astype(np.uint8)))
        rgba.save(buf, format="PNG", compress_level=1)
    elif kind == "palette":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, format="PNG", compress_level=1)
    else:
        rgb.save(buf, format="JPEG", quality=90)
    ext = "png" if kind in ("rgba", "palette") else "jpg"
    meta = {"label": CLASSES[int(label)], "width": w, "height": h, "caption": f"a photo of a {CLASSES[int(label)]}"}
    return {"__key__": key, ext: buf.getvalue(), "json": json.dumps(meta).encode()}


def weblike_shards(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    n_shards: int = 4,
    seed: int = 0,
    prefix: str = "web",
    sizes: tuple[int, int] = (48, 96),
) -> list[str]:
    """Write real images as web-like shards (see `weblike_sample`): varying sizes and modes, JSON labels."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, start = [], 0
    for s, size in enumerate(shard_sizes(len(images), n_shards)):
        path = out_dir / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path.with_suffix(".tar.tmp")), mtime=0) as sink:
            for i in range(start, start + size):
                sink.write(weblike_sample(images[i], labels[i], f"{i:08d}", rng, sizes))
        os.replace(path.with_suffix(".tar.tmp"), path)
        paths.append(str(path))
        start += size
    return paths


def fashion_mnist_shards(
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    data_dir=None,
    n_shards: int | None = None,
    uneven: bool = False,
    limit: int | None = None,
    image_format: str = "png",
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[str], Path]:
    """Write a Fashion-MNIST split as shards (default: one per ~1000 samples); returns (paths, source dir)."""
    images, labels = load_fashion_mnist(split, data_dir)
    if limit:
        images, labels = images[:limit], labels[:limit]
    n_shards = n_shards or max(4, len(images) // 1000)
    sizes = shard_sizes(len(images), n_shards, uneven=uneven, seed=seed)
    paths = write_shards(
        images, labels, out_dir, sizes=sizes, prefix=split, image_format=image_format, progress=progress
    )
    return paths, fashion_mnist_dir(data_dir)
