"""A webdataset sample to a training example: image decoding of any size and mode, the
training view, the label, or the user's own decode function.

Images: only the listed formats are opened (Pillow knows many more; its EPS reader runs
Ghostscript); EXIF orientation applied; greyscale, RGBA/LA (composited on white), palette,
CMYK, 16-bit and float images converted to the run's channels a strip of rows at a time;
more than `max_pixels` pixels or `max_bytes` bytes to decode refused before decoding
(decompression bombs; decoders that keep a second copy). Views: `resized` (random resized crop to S x S with
scale and aspect jitter and a flip, the usual recipe for web images; a centre crop without
augmentation) or `native` (images kept at the run's size: random crop with
padding and a flip; an image of another size is centre-cropped and resized to it).
No torchvision: the CPU route has no build of it, and these transforms are short.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from streamprune.errors import DamagedRunError, InputError, SettingsError
from streamprune.formats.classes import Classes
from streamprune.formats.rundir import RunDir
from streamprune.plugins import import_function
from streamprune.shards.labels import BadSample, Label, LabelSpec, check_label, sample_name

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "npy")
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")  # Pillow's readers of IMAGE_EXTS (PPM: pgm too)
MAX_PIXELS = 1 << 26  # 8192 x 8192: larger images are refused per sample
# Memory decoding one image may hold (_decoding_bytes): an 8-bit colour image at MAX_PIXELS (Pillow
# keeps 3 and 4 bands at 4 bytes a pixel), so no PNG, JPEG, BMP, GIF, PPM or plain TIFF under the
# pixel cap is refused for it; it stops WebP over 22 Mpx, a compressed TIFF whose strips would add a
# copy, and any image over it when `max_pixels` is raised. Converting adds at most 4 bytes a pixel.
MAX_BYTES = 256 << 20
STRIP_PIXELS = 1 << 18  # modes are converted a strip of about this many pixels at a time
SCALE = (0.08, 1.0)  # random resized crop: area fraction of the source image
RATIO = (3 / 4, 4 / 3)  # and its aspect ratio range
NATIVE_MAX = 256  # unset image size: the images' own size when they agree and are at most this
DEFAULT_SIZE = 224  # else S = 224 on GPUs
CPU_SIZE = 64  # and S = 64 on CPUs (a ResNet-18 step on one core: ~60 samples/s at 64 px, ~4 at 224)
PROBE_SAMPLES = 64


@dataclass(frozen=True)
class View:
    """How images become tensors: `(channels, height, width)` out, `resized` or `native`."""

    channels: int
    height: int
    width: int
    resized: bool
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def describe(self) -> str:
        mode = {1: "greyscale", 3: "RGB"}[self.channels]
        how = "random resized crop" if self.resized else "native size, padded random crop"
        return f"{self.width}x{self.height} {mode}, {how}"


def _image_member(sample: dict) -> str:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample(f"{sample_name(sample)}: no image member among {IMAGE_EXTS}")
    return ext


def open_image(
    data: bytes,
    where: str,
    max_pixels: int = MAX_PIXELS,
    channels: int | None = None,
    draft: tuple[int, int] | None = None,
    max_bytes: int = MAX_BYTES,
):
    """A PIL image of encoded bytes in one of PIL_FORMATS, upright (EXIF) and in `L` or `RGB`
    (`channels`; None: as stored when grey, else RGB). `draft` lets JPEG decode at a reduced scale
    no smaller than it. Over `max_pixels` pixels or `max_bytes` decoded bytes: refused unread."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            if im.width * im.height > max_pixels:
                raise BadSample(
                    f"{where}: image of {im.width}x{im.height} pixels is over the limit of "
                    f"{max_pixels:,} (a decompression bomb?)"
                )
            if draft is not None and im.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures
                im.draft("L" if channels == 1 else "RGB", draft)
            size = _decoding_bytes(im)
            if size > max_bytes:
                raise BadSample(
                    f"{where}: {im.width}x{im.height} {im.format} image in mode {im.mode} takes "
                    f"{size / 2**20:,.0f} MiB to decode, over the limit of {max_bytes / 2**20:,.0f} MiB a sample"
                )
            ImageOps.exif_transpose(im, in_place=True)  # decodes it
    except BadSample:
        raise
    except UnidentifiedImageError:
        fmt = _other_format(data)
        if fmt is not None:
            raise BadSample(
                f"{where}: image format {fmt} (by its signature) is not allowed: only {', '.join(PIL_FORMATS)} "
                "are opened"
            ) from None
        raise BadSample(f"{where}: cannot decode image: not a readable {', '.join(PIL_FORMATS)} image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(f"{where}: image refused: {exc}") from None
    except Exception as exc:
        raise BadSample(f"{where}: cannot decode image: {exc}") from None
    return _to_mode(im, channels)


def _decoding_bytes(im) -> int:
    """Memory decoding `im` holds at once: its pixels as Pillow keeps them (1, 2 or 4 bytes each),
    and the decoder's own copy where it keeps one: a WebP frame twice (libwebp's and Python's,
    4 bytes a pixel each), libtiff's buffer of one strip or tile of a compressed TIFF (a TIFF in
    one strip: the whole image again)."""
    from PIL import TiffImagePlugin

    pixels = im.width * im.height
    size = pixels * (1 if im.mode in ("1", "L", "P") else 2 if im.mode.startswith("I;16") else 4)
    if im.format == "WEBP":
        return size + 8 * pixels
    if isinstance(im, TiffImagePlugin.TiffImageFile) and im.tag_v2.get(259, 1) != 1:
        tags = im.tag_v2
        bits = max(tags.get(258, (1,))) * tags.get(277, 1)
        block = tags[322] * tags[323] if 322 in tags else im.width * min(tags.get(278, im.height), im.height)
        return size + (block * bits + 7) // 8
    return size


def _other_format(data: bytes) -> str | None:
    """The format outside PIL_FORMATS whose signature `data` starts with, if Pillow knows one: only
    the plugins' signature checks run, none opens the data."""
    from PIL import Image

    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt not in PIL_FORMATS and accept is not None:
            with contextlib.suppress(IndexError, TypeError, struct.error):  # tolerated as Image.open does
                if accept(data[:16]) is True:
                    return fmt
    return None


def _to_mode(im, channels: int | None):
    """`im` in `L` (channels 1, or None and grey) or `RGB`, converted a strip of rows at a time so
    that a large image's temporaries stay small."""
    from PIL import Image

    grey = im.mode in ("L", "1", "LA", "I", "F") or im.mode.startswith("I;16")
    want = "L" if (channels or (1 if grey else 3)) == 1 else "RGB"
    if im.mode == want:
        return im
    scaled = im.mode.startswith("I;16") or (im.mode in ("I", "F") and im.getextrema()[1] > 255)
    rows = max(1, STRIP_PIXELS // im.width)
    if rows >= im.height:
        return _convert(im, want, scaled)
    out = Image.new(want, im.size)
    for top in range(0, im.height, rows):
        out.paste(_convert(im.crop((0, top, im.width, min(top + rows, im.height))), want, scaled), (0, top))
    return out


def _convert(im, want: str, scaled: bool):
    """`im` in mode `want`: 16-bit and float pixels to 8 bits (divided by 257 when `scaled`),
    transparent ones composited on white."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if scaled else a
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im if im.mode == want else im.convert(want)


def _npy_image(data: bytes, where: str) -> np.ndarray:
    try:
        img = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise BadSample(f"{where}: cannot decode npy: {exc}") from None
    if img.ndim == 2:
        img = img[None]
    elif img.ndim == 3 and img.shape[-1] in (1, 3, 4) and img.shape[0] not in (1, 3):
        img = img.transpose(2, 0, 1)
    if img.ndim != 3 or img.shape[0] not in (1, 3, 4) or 0 in img.shape:
        raise BadSample(f"{where}: npy image of shape {img.shape} is not (H, W), (H, W, C) or (C, H, W)")
    return np.array(img[:3], dtype=np.uint8, order="C")


def decode_image(sample: dict, channels: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The sample's image as `(C, H, W)` uint8 at its own size (C from `channels`, or as stored)."""
    ext, where = _image_member(sample), sample_name(sample)
    if ext == "npy":
        img = _npy_image(sample[ext], where)
        return img if channels is None else _channels(img, channels)
    return _array(open_image(sample[ext], where, max_pixels, channels))


def _array(im) -> np.ndarray:
    """A PIL image as a writable `(C, H, W)` uint8 array."""
    a = np.array(im)
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _channels(img: np.ndarray, channels: int) -> np.ndarray:
    if img.shape[0] == channels:
        return img
    if channels == 3:
        return np.ascontiguousarray(np.repeat(img[:1], 3, axis=0))
    w = np.array([0.299, 0.587, 0.114])[:, None, None]
    return np.clip((img[:3] * w).sum(0, keepdims=True) + 0.5, 0, 255).astype(np.uint8)


def resized_crop_box(width: int, height: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """`(left, top, right, bottom)`: a random crop of SCALE area and RATIO aspect (torchvision's
    RandomResizedCrop rule: 10 tries, then a centre crop), or the centre square without `rng`."""
    if rng is not None:
        area = width * height
        log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
        for _ in range(10):
            target = area * rng.uniform(*SCALE)
            ratio = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                return x, y, x + w, y + h
        aspect = width / height
        if aspect < RATIO[0]:
            w, h = width, int(round(width / RATIO[0]))
        elif aspect > RATIO[1]:
            h, w = height, int(round(height * RATIO[1]))
        else:
            w, h = width, height
    else:
        w = h = min(width, height)
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def _fit_box(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """The centred crop of a `width x height` image with aspect `aspect` (w/h)."""
    if width / height > aspect:
        w, h = max(1, int(round(height * aspect))), height
    else:
        w, h = width, max(1, int(round(width / aspect)))
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def augment(img: np.ndarray, rng: np.random.Generator, pad: int | None = None) -> np.ndarray:
    """Random crop of a zero-padded image back to its size, then a random horizontal flip."""
    c, h, w = img.shape
    pad = max(1, min(h, w) // 8) if pad is None else pad
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    y, x = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[:, y : y + h, x : x + w]
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 `(C, H, W)` to float in [-1, 1]."""
    return torch.from_numpy(img).float().div_(127.5).sub_(1.0)


def view_image(sample: dict, view: View | None, rng: np.random.Generator | None) -> np.ndarray:
    """The sample's image as the run sees it: `view.shape` uint8 (None: its own size and channels),
    augmented when `rng` is given."""
    from PIL import Image

    if view is None:
        img = decode_image(sample)
        return augment(img, rng) if rng is not None else img
    ext, where = _image_member(sample), sample_name(sample)
    size, mode = (view.width, view.height), "L" if view.channels == 1 else "RGB"
    if ext == "npy":
        arr = _channels(_npy_image(sample[ext], where), view.channels)
        if arr.shape == view.shape and not view.resized:
            return augment(arr, rng) if rng is not None else arr
        im = Image.fromarray(arr[0] if view.channels == 1 else arr.transpose(1, 2, 0))
    else:
        draft = size if view.resized else None
        # a grey image becomes RGB once resized to the view (the same pixels as converting first,
        # without an RGB copy of a large image at 4 bytes a pixel)
        channels = 1 if view.channels == 1 else None
        im = open_image(sample[ext], where, view.max_pixels, channels, draft, view.max_bytes)
    if view.resized:
        box = resized_crop_box(im.width, im.height, rng)
        im = im.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        if rng is not None and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _array(im.convert(mode))
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR, box=_fit_box(im.width, im.height, view.width / view.height))
    arr = _array(im.convert(mode))
    return augment(arr, rng) if rng is not None else arr


class SampleDecoder:
    """A sample dict to `(float tensor, class index)`: the run's image view (None: each image at
    its own size) and label, or a user's `decode` function (`package.module:function`, sample
    dict -> `(tensor or array, label)`). Picklable; raises BadSample (LabelError for the label)."""

    def __init__(
        self,
        view: View | None = None,
        label: str | LabelSpec = "cls",
        classes: Classes | None = None,
        decode: str | None = None,
    ):
        self.view, self.classes, self.decode = view, classes, decode
        self.label_spec = label if isinstance(label, LabelSpec) else LabelSpec(label)
        self._fn: Callable | None = None

    def __getstate__(self):
        return {**self.__dict__, "_fn": None}

    def user_decode(self, sample: dict) -> tuple[object, Label]:
        if self._fn is None:
            assert self.decode is not None  # called only with a decode function
            self._fn = import_function(self.decode, "decode")
        try:
            out = self._fn(sample)
        except BadSample:
            raise
        except Exception as exc:
            raise BadSample(f"{sample_name(sample)}: decode function {self.decode!r} failed: {exc!r}") from None
        if not isinstance(out, tuple) or len(out) != 2:
            raise BadSample(
                f"{sample_name(sample)}: decode function {self.decode!r} must return (tensor, label), "
                f"not {type(out).__name__}"
            )
        return out[0], check_label(out[1], sample_name(sample), f"the label from {self.decode}")

    @property
    def label_members(self) -> tuple[str, ...] | None:
        """Members to read for the label alone (None: all, for a decode function)."""
        return None if self.decode else self.label_spec.members

    def raw_label(self, sample: dict) -> Label:
        """The sample's label before the class list maps it (an int or a name)."""
        return self.user_decode(sample)[1] if self.decode else self.label_spec(sample)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The example; augmented when `rng` is given (a decode function does its own)."""
        if self.decode:
            x, label = self.user_decode(sample)
            x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).float()
        else:
            label = self.label_spec(sample)
            x = to_tensor(view_image(sample, self.view, rng))
        if self.classes is not None:
            return x, self.classes.index_of(label, sample_name(sample))
        if isinstance(label, str):
            raise InputError(f"{sample_name(sample)}: label {label!r} is a name and no class list was given")
        return x, label


@dataclass(frozen=True)
class Probe:
    """The sizes `(height, width)` of a run's first decodable images, and whether all are grey."""

    sizes: frozenset[tuple[int, int]]
    grey: bool

    @property
    def native(self) -> bool:
        """Whether the images are kept at their own size: one size, at most NATIVE_MAX."""
        return len(self.sizes) == 1 and max(next(iter(self.sizes))) <= NATIVE_MAX

    def describe(self) -> str:
        """'images of 300x300 px', or 'images of mixed sizes (40x40 .. 120x96)' (smallest .. largest)."""
        shown = sorted((h * w, f"{w}x{h}") for h, w in self.sizes)
        if len(shown) == 1:
            return f"images of {shown[0][1]} px"
        return f"images of mixed sizes ({shown[0][1]} .. {shown[-1][1]})"

    def view(self, image_size: int | None, fallback: int = DEFAULT_SIZE, max_pixels: int = MAX_PIXELS) -> View:
        """`image_size` square when given; else their own size when `native`, else `fallback` square."""
        channels = 1 if self.grey else 3
        if image_size is None and self.native:
            h, w = next(iter(self.sizes))
            return View(channels, h, w, False, max_pixels)
        size = fallback if image_size is None else image_size
        return View(channels, size, size, True, max_pixels)


def probe_images(samples: Iterable[dict], max_pixels: int = MAX_PIXELS) -> Probe:
    """The sizes of the first PROBE_SAMPLES decodable images of `samples`."""
    sizes, grey, seen = set(), True, 0
    for sample in samples:
        try:
            ext = _image_member(sample)
            img = (
                _npy_image(sample[ext], sample_name(sample))
                if ext == "npy"
                else _array(open_image(sample[ext], sample_name(sample), max_pixels))
            )
        except BadSample:
            continue
        sizes.add(img.shape[1:])
        grey &= img.shape[0] == 1
        seen += 1
        if seen >= PROBE_SAMPLES:
            break
    if not seen:
        raise BadSample("no decodable image among the first samples")
    return Probe(frozenset(sizes), grey)


def probe_view(samples: Iterable[dict], image_size: int | None, max_pixels: int = MAX_PIXELS) -> View:
    """The view of a run on GPUs from its first decodable images (`Probe.view`): `image_size` square
    when given; else their own size when `native`, else DEFAULT_SIZE. Greyscale when all are grey."""
    if image_size is not None and image_size < 1:
        raise SettingsError(f"image size must be >= 1, not {image_size}")
    return probe_images(samples, max_pixels).view(image_size, max_pixels=max_pixels)


class ToTensors:
    """Pipeline stage: a sample dict to `(float tensor, class index)`, augmented when asked.

    `decoder` (default: `cls` labels, images at their own size), or its parts: `label`,
    `classes`, `decode` as in SampleDecoder and `image_size` for an RGB resized view.
    Picklable, with its random generator made in the process that uses it from `seed` and, in
    a DataLoader worker, the worker's torch seed (the loader's base seed, drawn from the torch
    generator, plus the worker id): each worker gets its own stream, and a process seeded with
    `torch.manual_seed` (or a loader with a seeded `generator`) gets the same streams again."""

    rng: np.random.Generator | None

    def __init__(
        self,
        seed: int = 0,
        do_augment: bool = True,
        *,
        decoder: SampleDecoder | None = None,
        label: str = "cls",
        classes: Classes | None = None,
        decode: str | None = None,
        image_size: int | None = None,
    ):
        view = None if image_size is None else View(3, image_size, image_size, True)
        self.seed, self.do_augment, self.rng = seed, do_augment, None
        self.decoder = decoder or SampleDecoder(view, label, classes, decode)

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        if self.rng is None:
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed] if info is None else [self.seed, info.seed])
        return self.decoder(sample, self.rng if self.do_augment else None)


def run_decoder(run: str | os.PathLike) -> SampleDecoder:
    """How a recorded run turns samples into examples (its view, label, classes, decode function),
    for training fresh models on the same inputs."""
    from streamprune.formats.stats_store import StatsStore

    rc = StatsStore.open(RunDir(run).stats, mode="r").config
    classes = Classes.load(run) if rc.get("classes") else None
    if classes is not None and classes.digest != rc["classes"]:
        raise DamagedRunError(f"{RunDir(run).classes!r} is not the class list {os.fspath(run)!r} was recorded with")
    classes = classes or Classes(rc.get("num_classes") or 1, label=rc.get("decode") or rc.get("label", "cls"))
    view = rc.get("view")
    return SampleDecoder(None if view is None else View(*view), rc.get("label", "cls"), classes, rc.get("decode"))
