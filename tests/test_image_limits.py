"""Images as an attacker or a careless producer makes them: formats streamprune does not list
(EPS, which Pillow hands to Ghostscript, and others Pillow knows), and large images under the
pixel cap that used to take gigabytes to convert (16-bit PNG, float TIFF, RGBA): decoded in
bounded memory (measured in a fresh process), at reduced scale (JPEG and MPO), or refused per
sample and listed in `RUN/bad-samples.jsonl`."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from streamprune import IndexedShards, index_in_process
from streamprune.shards.labels import BadSample
from streamprune.training.decode import MAX_BYTES, SampleDecoder, ToTensors, View, decode_image, view_image


def _saved(im: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def _pattern() -> np.ndarray:
    """A 10 x 12 RGB image of four colours (exact through GIF's palette)."""
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[:, 6:] = (200, 30, 90)
    rgb[5:, :] //= 2
    rgb[5:, :6] = (10, 250, 40)
    return rgb


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(
    width: int, height: int, depth: int, colour: int, row: Callable[[int], bytes], rows: int | None = None
) -> bytes:
    """A PNG of `width x height` (`depth` bits, PNG colour type `colour`) whose pixel row `r` is
    `row(r)`, compressed a row at a time (a huge image costs little to make); `rows`: only so many
    rows are written (a header claiming more than the data holds)."""
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(b"\0" + row(r)) for r in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _float_tiff(width: int, height: int, value: Callable[[int], float], rows_per_strip: int) -> bytes:
    """A float (Pillow mode F) deflate TIFF whose row `r` holds `value(r)`, in strips of
    `rows_per_strip` rows (Pillow writes 2; in one strip, libtiff buffers the whole image)."""

    def strip(top: int) -> bytes:
        z = zlib.compressobj(6)
        rows = range(top, min(top + rows_per_strip, height))
        return b"".join(z.compress(np.full(width, value(r), "<f4").tobytes()) for r in rows) + z.flush()

    strips = [strip(top) for top in range(0, height, rows_per_strip)]
    n, ifd_end = len(strips), 8 + 2 + 12 * 10 + 4  # header, then 10 tags; then the strip arrays when n > 1
    offsets = np.cumsum([ifd_end + (8 * n if n > 1 else 0), *map(len, strips[:-1])]).tolist()
    tags = [  # tag, type (3: 16 bits, 4: 32 bits), values
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [32]),  # bits per sample
        (259, 3, [8]),  # deflate
        (262, 3, [1]),  # black is zero
        (273, 4, offsets),
        (277, 3, [1]),  # samples per pixel
        (278, 4, [rows_per_strip]),
        (279, 4, [len(d) for d in strips]),
        (339, 3, [3]),  # IEEE float
    ]
    ifd, arrays = struct.pack("<H", len(tags)), b""
    for tag, kind, values in tags:
        data = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(data) > 4:  # stored after the directory, which points to it
            data, arrays = struct.pack("<I", ifd_end + len(arrays)), arrays + data
        ifd += struct.pack("<HHI", tag, kind, len(values)) + data.ljust(4, b"\0")
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + arrays + b"".join(strips)


# --- formats ------------------------------------------------------------------------------------


def test_only_the_listed_formats_are_opened_whatever_the_member_is_called():
    rgb = _pattern()
    im = Image.fromarray(rgb)
    listed = {
        "PNG": _saved(im, "PNG"),
        "WEBP": _saved(im, "WEBP", lossless=True),
        "BMP": _saved(im, "BMP"),
        "GIF": _saved(im, "GIF"),
        "TIFF": _saved(im, "TIFF"),
        "PPM": _saved(im, "PPM"),
    }
    for fmt, data in listed.items():  # stored as .jpg: opened for what they are, when listed
        assert np.array_equal(decode_image({"__key__": fmt, "jpg": data}), rgb.transpose(2, 0, 1)), fmt
    pgm = decode_image({"__key__": "pgm", "png": _saved(im.convert("L"), "PPM")})
    assert np.array_equal(pgm[0], np.asarray(im.convert("L")))
    jpeg = decode_image({"__key__": "jpeg", "png": _saved(im, "JPEG", quality=100, subsampling=0)})
    assert np.abs(jpeg.astype(int) - rgb.transpose(2, 0, 1)).mean() < 8
    for fmt, mode in (("PCX", "RGB"), ("ICO", "RGBA"), ("SGI", "RGB"), ("QOI", "RGB"), ("DDS", "RGB"), ("XBM", "1")):
        with pytest.raises(
            BadSample,
            match=rf"sample '{fmt}' of 's.tar'.*image format {fmt} \(by its signature\) is not allowed: only PNG",
        ):
            decode_image({"__key__": fmt, "__url__": "s.tar", "jpg": _saved(im.convert(mode), fmt)})
    with pytest.raises(BadSample, match="sample 'spider'.*cannot decode image: not a readable PNG, JPEG"):
        decode_image({"__key__": "spider", "jpg": _saved(im.convert("F"), "SPIDER")})  # Pillow's, no signature


def test_an_eps_stored_as_jpg_is_refused_and_ghostscript_never_starts(tmp_path):
    """A `gs` first on PATH records any start: Pillow's EPS plugin would run it (`gs --version`,
    then the conversion) had the EPS been opened."""
    started = tmp_path / "gs-started"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {started}\nexit 1\n')
    (bin_dir / "gs").chmod(0o755)
    eps = tmp_path / "a.eps"
    eps.write_bytes(_saved(Image.fromarray(_pattern()), "EPS"))
    code = (
        "import sys\nfrom streamprune.shards.labels import BadSample\n"
        "from streamprune.training.decode import decode_image\n"
        "try:\n    decode_image({'__key__': 'k', '__url__': 's.tar', 'jpg': open(sys.argv[1], 'rb').read()})\n"
        "except BadSample as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-c", code, str(eps)], capture_output=True, text=True, env=env, check=True)
    assert "sample 'k' of 's.tar': image format EPS (by its signature) is not allowed" in out.stdout, out.stderr
    assert not started.exists(), started.read_text()


# --- size in bytes ------------------------------------------------------------------------------


def test_an_image_over_the_byte_cap_is_refused_before_it_is_decoded():
    """9000 x 9000 RGB is under a raised pixel cap, but 309 MiB decoded (Pillow keeps RGB at 4
    bytes a pixel). The PNG holds one row of data: decoding it would fail as truncated instead.
    The one-strip float TIFF, below, is refused for libtiff's copy of the image."""
    claiming = _png(9000, 9000, 8, 2, lambda r: bytes(3 * 9000), rows=1)
    sample = {"__key__": "wide", "__url__": "s.tar", "png": claiming}
    with pytest.raises(
        BadSample, match=r"'wide' of 's.tar': 9000x9000 PNG image in mode RGB takes 309 MiB to decode, over .* 256 MiB"
    ):
        decode_image(sample, max_pixels=1 << 27)
    assert MAX_BYTES == 256 << 20
    small = _png(90, 90, 8, 2, lambda r: bytes([r]) * 270)  # the same kind of image, small: decoded
    assert decode_image({"__key__": "s", "png": small})[:, :, 7].tolist() == [list(range(90))] * 3


def test_refused_images_are_listed_in_bad_samples_jsonl_and_the_others_train(tmp_path):
    rgb = _pattern()
    shard = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(3):
            sink.write({"__key__": f"ok{i}", "png": _saved(Image.fromarray(rgb + i), "PNG"), "cls": b"1"})
        sink.write({"__key__": "eps", "jpg": _saved(Image.fromarray(rgb), "EPS"), "cls": b"1"})
        sink.write({"__key__": "wide", "png": _png(9000, 9000, 8, 2, lambda r: bytes(27000), rows=1), "cls": b"1"})
    run = tmp_path / "run"
    index_in_process(str(shard), run)
    decoder = SampleDecoder(View(3, 16, 16, True, max_pixels=1 << 27))
    data = IndexedShards(run, ToTensors(decoder=decoder, do_augment=False), shuffle_buffer=1)
    got = list(data)
    assert sorted(row for _, _, row in got) == [0, 1, 2] and all(x.shape == (3, 16, 16) for x, _, _ in got)
    listed = {e["key"]: e for e in map(json.loads, (run / "bad-samples.jsonl").read_text().splitlines())}
    assert set(listed) == {"eps", "wide"}
    assert "image format EPS (by its signature) is not allowed" in listed["eps"]["reason"]
    assert "9000x9000 PNG image in mode RGB takes 309 MiB to decode" in listed["wide"]["reason"]


def test_phone_jpegs_with_a_second_picture_decode_at_reduced_scale_as_jpegs_do():
    """MPO (a JPEG followed by more pictures, as phones write) is drafted like JPEG: its view is
    the plain JPEG's, pixel for pixel (it was decoded at full size)."""
    y, x = np.mgrid[0:1024, 0:1024]
    first = Image.fromarray(np.stack([x % 256, y % 256, (x // 7 + y // 5) % 256], -1).astype(np.uint8))
    mpo = _saved(first, "MPO", save_all=True, append_images=[first.rotate(90)], quality=90)
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    view = View(3, 64, 64, True)
    plain = view_image({"__key__": "j", "jpg": _saved(first, "JPEG", quality=90)}, view, None)
    assert np.array_equal(view_image({"__key__": "m", "jpg": mpo}, view, None), plain)


# --- memory -------------------------------------------------------------------------------------

SIDE = 8190  # 8190^2 = 67,076,100 pixels: just under the 2^26 pixel cap
RGBA_SIDE = 5792  # 5792^2 x 4 bytes: just under 128 MiB


def _deep(r: int) -> int:
    return r * 8  # 16-bit grey: 0 .. 65,512


def _real(r: int) -> float:
    return float(np.float32(r * 7.9))  # float: 0 .. 64,693


def _rgba(r: int) -> tuple[int, int, int, int]:
    level = r * 255 // RGBA_SIDE  # colour and opacity change slowly down the rows
    return level, 128, 255 - level, 64 + level * 3 // 4


@pytest.fixture(scope="module")
def large_images(tmp_path_factory) -> dict[str, Path]:
    """Row-constant images on disk: a 16-bit PNG (130 KB) and float TIFFs (420 and 290 KB) of
    8190 x 8190, and an RGBA PNG of 5792 x 5792."""
    out = tmp_path_factory.mktemp("large")
    files = {
        "deep.png": _png(SIDE, SIDE, 16, 0, lambda r: struct.pack(">H", _deep(r)) * SIDE),
        "real.tiff": _float_tiff(SIDE, SIDE, _real, rows_per_strip=2),
        "one-strip.tiff": _float_tiff(SIDE, SIDE, _real, rows_per_strip=SIDE),
        "rgba.png": _png(RGBA_SIDE, RGBA_SIDE, 8, 6, lambda r: bytes(_rgba(r)) * RGBA_SIDE),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: out / name for name in files}


def test_a_float_tiff_in_one_strip_is_refused_for_libtiffs_copy_of_it():
    """Under the pixel cap, but libtiff would hold its one strip, the whole image, beside Pillow's
    256 MiB: refused before decoding. The same image in strips of 2 rows decodes (below). (The
    `large_images` one-strip TIFF, built alone: the fixture's other images serve slow tests only.)"""
    one_strip = _float_tiff(SIDE, SIDE, _real, rows_per_strip=SIDE)
    sample = {"__key__": "big", "__url__": "big.tar", "tiff": one_strip}
    with pytest.raises(BadSample) as refused:
        decode_image(sample)
    assert str(refused.value) == (
        "sample 'big' of 'big.tar': 8190x8190 TIFF image in mode F takes 512 MiB to decode, over the limit of "
        "256 MiB a sample"
    )


MEASURE = """
import json, sys, time
from streamprune.training.decode import View, decode_image, view_image

def peak_mib():  # this process' peak resident memory (ru_maxrss counts its parent's size at the fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

path, how, channels = sys.argv[1], sys.argv[2], int(sys.argv[3])
sample = {"__key__": "big", "__url__": "big.tar", path.rpartition(".")[2]: open(path, "rb").read()}
before, start = peak_mib(), time.perf_counter()
out = decode_image(sample) if how == "own" else view_image(sample, View(channels, 224, 224, True), None)
seconds, peak = time.perf_counter() - start, peak_mib()
constant = bool((out == out[:, :, :1]).all())
print(json.dumps({"shape": out.shape, "column": out[:, :, 0].T.tolist(), "rows_constant": constant,
                  "seconds": seconds, "before_mib": before, "peak_mib": peak}))
"""


def _expected_column(name: str, height: int) -> np.ndarray:
    """What each row of the image converts to: `(height, channels)` uint8."""
    if name == "rgba.png":  # composited on white
        rows = np.array([_rgba(r) for r in range(height)], np.uint8)[None]
        white = Image.new("RGBA", (1, height), (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, Image.fromarray(rows.transpose(1, 0, 2))).convert("RGB"))[:, 0]
    value = np.array([(_deep if name == "deep.png" else _real)(r) for r in range(height)])
    return np.rint(value / 257).astype(np.uint8)[:, None]  # 16 bits (and floats over 255) scaled to 8


@pytest.mark.parametrize(
    "name, how, channels",
    [
        ("deep.png", "own", 1),
        ("deep.png", "view", 3),
        ("real.tiff", "own", 1),
        ("rgba.png", "view", 3),
    ],
)
@pytest.mark.slow  # decodes 2^26-pixel images in fresh processes
def test_large_images_under_the_pixel_cap_decode_in_bounded_memory(large_images, name, how, channels):
    """A fresh process decodes one image: at its own size (`decode_image`) or the run's 224 x 224
    view. Converting used to take 1.7 GiB (16-bit PNG) and 1.8 GiB (float TIFF) over the process'
    own size; now the image as decoded, its 8-bit conversion and a strip of temporaries."""
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(large_images[name]), how, str(channels)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    grown = got["peak_mib"] - got["before_mib"]
    side = RGBA_SIDE if name == "rgba.png" else SIDE
    decoded, converted = side * side * (2 if name == "deep.png" else 4), side * side * (4 if name == "rgba.png" else 1)
    assert grown < (decoded + converted) / 2**20 + 96, f"{name} {how}: {grown:.0f} MiB over {got['before_mib']:.0f}"
    assert got["seconds"] < 30 and got["rows_constant"]
    column, want = np.array(got["column"], np.uint8), _expected_column(name, side)
    if how == "own":
        assert got["shape"] == [channels, side, side] and np.array_equal(column, want)
    else:  # 224 rows, each a bilinear average of about 37 rows of the image (which change by at most 1 a row)
        assert got["shape"] == [channels, 224, 224]
        centres = want[((np.arange(224) + 0.5) * side / 224).astype(int)]
        assert np.abs(column.astype(int) - np.broadcast_to(centres, column.shape)).max() <= 2
