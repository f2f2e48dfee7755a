"""Inputs as users have them: label specs and class lists, images of any size and mode, web-like
shards with JSON labels recorded end to end, and a user's own decode function and model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from streamprune.demo.datasets import CLASSES, weblike_sample, weblike_shards
from streamprune.formats.classes import Classes
from streamprune.shards.labels import BadSample, LabelError, LabelSpec
from streamprune.training.decode import (
    DEFAULT_SIZE,
    RATIO,
    SCALE,
    SampleDecoder,
    View,
    decode_image,
    open_image,
    probe_view,
    resized_crop_box,
    view_image,
)


def _png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)).save(buf, "PNG", **save)
    return buf.getvalue()


# --- labels -------------------------------------------------------------------------------------


def test_label_specs_read_members_json_paths_and_functions():
    sample = {
        "__key__": "k-dog",
        "__url__": "s.tar",
        "cls": b" 3\n",
        "txt": b"cat",
        "json": json.dumps({"label": "Bag", "meta": {"y": 7}, "flag": True}).encode(),
    }
    assert LabelSpec("cls")(sample) == 3
    assert LabelSpec("txt")(sample) == "cat"
    assert LabelSpec("json:label")(sample) == "Bag"
    assert LabelSpec("json:meta.y")(sample) == 7
    assert LabelSpec("feature_plugins:label_from_key")(sample) == "dog"
    assert LabelSpec("json:label").members == ("json",) and LabelSpec("feature_plugins:label_from_key").members is None
    with pytest.raises(LabelError, match=r"'k-dog' of 's.tar'.*no field 'meta.z'"):
        LabelSpec("json:meta.z")(sample)
    with pytest.raises(LabelError, match="json field 'flag' is True, not an integer class or a class name"):
        LabelSpec("json:flag")(sample)
    with pytest.raises(LabelError, match="no .label member"):
        LabelSpec("label")(sample)
    with pytest.raises(LabelError, match="not valid JSON"):
        LabelSpec("json:label")({**sample, "json": b"{oops"})
    for bad in ("json:", "json:a..b", "Not A Spec", "a:b:c"):
        with pytest.raises(ValueError, match="label"):
            LabelSpec(bad)
    with pytest.raises(ValueError, match="cannot import"):
        LabelSpec("no_such_module_xyz:f")(sample)


def test_class_lists_from_labels_files_and_the_run(tmp_path):
    from collections import Counter

    named = Classes.from_labels(Counter({"dog": 3, "cat": 5}), "json:label")
    assert named.names == ("cat", "dog") and named.counts == (5, 3) and named.index_of("dog") == 1
    ints = Classes.from_labels(Counter({0: 2, 4: 1}))
    assert ints.names is None and ints.num_classes == 5 and ints.counts == (2, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="mix class names"):
        Classes.from_labels(Counter({"dog": 1, 3: 1}))
    with pytest.raises(ValueError, match="'wolf' is not among the run's 2 classes"):
        named.index_of("wolf")
    with pytest.raises(ValueError, match=r"label 5 is outside \[0, 5\)"):
        ints.index_of(5)
    named.save(tmp_path)
    assert Classes.load(tmp_path) == named and Classes.from_file(tmp_path / "classes.json") == named
    (tmp_path / "names.txt").write_text("b\na\n\n")
    (tmp_path / "names.json").write_text('["b", "a"]')
    assert Classes.from_file(tmp_path / "names.txt").names == ("b", "a")
    assert Classes.from_file(tmp_path / "names.json").names == ("b", "a")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="names 'a' twice"):
        Classes.from_file(tmp_path / "dup.txt")
    doc = json.loads((tmp_path / "classes.json").read_text())
    (tmp_path / "classes.json").write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(ValueError, match="newer streamprune"):
        Classes.load(tmp_path)


def _label_shard(path, labels: dict[str, bytes]) -> str:
    """A real shard of small real PNGs, one per key, each with the given `.cls` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, cls in labels.items():
            sink.write({"__key__": key, "png": _png(np.full((16, 16), 7 * len(key), np.uint8)), "cls": cls})
    return str(path)


UNUSABLE_INTEGER_LABELS = {
    "two63": b"9223372036854775808",  # 2^63: no int64 holds it
    "two64": b"18446744073709551615",
    "digits": b"7" * 5000,  # beyond Python's int-from-string limit
    "minus1": b"-1",
    "below": b"-9223372036854775809",
}


def test_integer_labels_beyond_int64_or_negative_are_label_errors_naming_shard_and_key(tmp_path):
    shard = _label_shard(tmp_path / "labels.tar", {"largest": b"9223372036854775807", **UNUSABLE_INTEGER_LABELS})
    samples = list(wds.WebDataset(shard, shardshuffle=False))
    assert LabelSpec("cls")(samples[0]) == 2**63 - 1  # the largest an int64 holds is a label
    for sample in samples[1:]:
        with pytest.raises(LabelError, match=rf"^sample '{sample['__key__']}' of '{shard}': label .cls is "):
            LabelSpec("cls")(sample)
    for value in (2**63, 10**30, -(2**63) - 1, 1e3, "7"):  # as a JSON field; "7" is a class name
        sample = {"__key__": "j", "__url__": shard, "json": json.dumps({"y": value}).encode()}
        if isinstance(value, str):
            assert LabelSpec("json:y")(sample) == "7"
            continue
        with pytest.raises(LabelError, match=rf"^sample 'j' of '{shard}': json field 'y' is "):
            LabelSpec("json:y")(sample)


def test_the_class_count_is_inferred_only_up_to_a_bound():
    from collections import Counter

    from streamprune.errors import InputError
    from streamprune.shards.labels import MAX_INFERRED_CLASSES

    assert MAX_INFERRED_CLASSES == 100_000
    top = Classes.from_labels(Counter({MAX_INFERRED_CLASSES - 1: 1, 0: 2}))
    assert top.num_classes == MAX_INFERRED_CLASSES and top.counts[-1] == 1
    with pytest.raises(InputError, match=r"labels \(cls\): label 100,000 would make 100,001 classes.*--num-classes"):
        Classes.from_labels(Counter({100_000: 1, 0: 2}), "cls")


def test_record_refuses_an_inferred_class_count_above_the_bound_before_starting_ray(make_index, tmp_path):
    from streamprune import record
    from streamprune.errors import InputError

    labels = {f"k{i}": b"%d" % (i % 3) for i in range(6)}
    shard = _label_shard(tmp_path / "shards" / "a.tar", {**labels, "stray": b"100000"})
    run = tmp_path / "run"
    make_index([shard], run)
    with pytest.raises(InputError, match=rf"^sample 'stray' of '{shard}': label 100,000 would make 100,001 classes"):
        record(run, 1, progress=False)
    with pytest.raises(InputError, match=rf"^sample 'stray' of '{shard}': label 100000 is outside \[0, 10\)"):
        record(run, 1, num_classes=10, progress=False)
    assert not (run / "stats.zarr").exists()  # both refused before any work
    samples = list(wds.WebDataset(shard, shardshuffle=False))
    decoder = SampleDecoder(probe_view(samples, None), "cls", Classes(10))  # --num-classes 10
    assert decoder(samples[0])[1] == 0
    with pytest.raises(InputError, match=rf"sample 'stray' of '{shard}': label 100000 is outside \[0, 10\)") as info:
        decoder(samples[-1])
    assert not isinstance(info.value, BadSample)  # the classes do not fit the data: stop, do not skip


# --- images ---------------------------------------------------------------------------------------


def test_image_modes_are_converted_and_exif_orientation_is_applied():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)  # a red stripe on the left
    where = "sample 'x'"
    assert open_image(_png(rgb), where).mode == "RGB"
    assert open_image(_png(rgb, "L"), where).mode == "L"  # grey stays grey unless asked
    assert open_image(_png(rgb, "L"), where, channels=3).mode == "RGB"
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black: white on the white background
    assert (np.asarray(open_image(_png(rgba), where)) == 255).all()
    palette = open_image(_png(rgb, "P"), where)
    assert palette.mode == "RGB" and tuple(np.asarray(palette)[0, 0]) == (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    cmyk = np.asarray(open_image(buf.getvalue(), where))
    assert cmyk.shape == (20, 30, 3) and cmyk[10, 2, 0] > 200 and cmyk[10, 2, 1] < 60
    deep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    assert np.asarray(open_image(_png(deep), where)).max() == 245  # round(63000 / 257): 16 bits scaled to 8
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter counter-clockwise: viewers turn it back
    buf = io.BytesIO()
    Image.fromarray(rgb).transpose(Image.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    upright = np.asarray(open_image(buf.getvalue(), where))
    assert upright.shape == (20, 30, 3) and upright[10, 2, 0] > 200 and upright[10, 25, 0] < 60


def test_decompression_bombs_and_garbage_are_refused_per_sample(png_claiming):
    for data, reason in (
        (png_claiming(100_000, 100_000), "decompression bomb"),
        (png_claiming(9000, 9000), "over the limit"),
        (b"GIF89a garbage", "cannot decode"),
    ):
        with pytest.raises(BadSample, match=reason):
            decode_image({"__key__": "k", "__url__": "u.tar", "png": data})
    with pytest.raises(BadSample, match="no image member"):
        decode_image({"__key__": "k", "txt": b"hello"})


def test_random_resized_crops_stay_inside_and_follow_the_scale_and_ratio_ranges():
    rng = np.random.default_rng(0)
    for width, height in ((96, 48), (50, 90), (64, 64), (300, 20)):
        for _ in range(200):
            x0, y0, x1, y1 = resized_crop_box(width, height, rng)
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            if (width, height) != (300, 20):  # extreme aspect: torchvision's fallback crop
                area, ratio = (x1 - x0) * (y1 - y0), (x1 - x0) / (y1 - y0)
                assert SCALE[0] * 0.9 <= area / (width * height) <= 1.0
                assert RATIO[0] * 0.9 <= ratio <= RATIO[1] * 1.1
    assert resized_crop_box(96, 48, None) == (24, 0, 72, 48)  # unaugmented: the centre square


def test_views_give_the_run_shape_for_any_input_size():
    rng = np.random.default_rng(0)
    images, labels = np.random.default_rng(1).integers(0, 255, (3, 28, 28), dtype=np.uint8), [1, 2, 3]
    samples = [weblike_sample(images[i], labels[i], f"{i}", rng) for i in range(3)]
    view = View(3, 64, 64, True)
    for sample in samples:
        assert view_image(sample, view, rng).shape == (3, 64, 64)
        assert view_image(sample, view, None).shape == (3, 64, 64)
    native = View(1, 28, 28, False)
    small = {"__key__": "s", "png": _png(np.zeros((14, 20), np.uint8))}
    assert view_image(small, native, None).shape == (1, 28, 28)  # another size: resized, not refused
    assert view_image(samples[0], native, rng).shape == (1, 28, 28)


def test_probe_view_keeps_small_equal_images_and_picks_a_default_for_mixed_sizes():
    grey = [{"__key__": str(i), "png": _png(np.full((28, 28), i, np.uint8))} for i in range(5)]
    assert probe_view(grey, None) == View(1, 28, 28, False)
    assert probe_view(grey, 64) == View(1, 64, 64, True)
    rng = np.random.default_rng(0)
    mixed = [weblike_sample(np.zeros((28, 28), np.uint8), 0, str(i), rng) for i in range(8)]
    assert probe_view(mixed, None) == View(3, DEFAULT_SIZE, DEFAULT_SIZE, True)
    big = [{"__key__": "b", "png": _png(np.zeros((300, 300), np.uint8))}]
    assert probe_view(big, None).height == DEFAULT_SIZE
    with pytest.raises(BadSample, match="no decodable image"):
        probe_view([{"__key__": "x", "png": b"junk"}], None)


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weblike(tmp_path_factory, fmnist):
    """400 real Fashion-MNIST images as web-like shards: 48-96 px, mixed modes, JSON class names."""
    images, labels = fmnist
    out = tmp_path_factory.mktemp("web")
    return weblike_shards(images[:400], labels[:400], out, n_shards=4), labels[:400]


def test_weblike_shards_with_json_labels_record_without_skips_and_reduce_exactly(
    ray_session, tmp_path, weblike, capsys
):
    from streamprune import reduce
    from streamprune.cli.main import main
    from streamprune.formats.stats_store import StatsStore

    paths, labels = weblike
    run = tmp_path / "run"
    assert main(["index", *paths, "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "record",
                str(run),
                "--epochs",
                "2",
                "--label",
                "json:label",
                "--image-size",
                "64",
                "--model",
                "small-cnn",
                "--workers",
                "1",
                "--loader-workers",
                "1",
                "--schedule-epochs",
                "6",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "undecodable" not in out and "64x64 RGB, random resized crop; 10 classes" in out
    assert not (run / "bad-samples.jsonl").exists()
    classes = Classes.load(run)  # the names were counted over every shard, as `index --label` does
    assert classes.names == tuple(sorted(CLASSES)) and sum(classes.counts) == 400
    assert main(["index", *paths, "--out", str(tmp_path / "other"), "--label", "json:label", "--quiet"]) == 0
    assert Classes.load(tmp_path / "other") == classes
    from streamprune.inspection.run_state import run_state

    assert run_state(run)["index"]["classes"] == "10 (json:label, names in classes.json)"
    store = StatsStore.open(run / "stats.zarr", mode="r")
    assert store.complete_epochs() == 2 and np.isfinite(store.read("p_true")).all()
    want = np.array([classes.index_of(CLASSES[y]) for y in labels])
    assert (store.labels() == want).all()
    keep = reduce(run, 0.3, "dual-beta", progress=False)  # window: T = 2 when fewer than 10 epochs
    assert len(keep) == 280 and keep.manifest["window"] == 2
    from streamprune.training.decode import run_decoder

    decoder = run_decoder(run)
    x, y = decoder(next(iter(wds.WebDataset(paths[0], shardshuffle=False))))
    assert tuple(x.shape) == (3, 64, 64) and y == want[0]


def test_a_decode_function_and_model_factory_record_feature_vectors(ray_session, tmp_path):
    from streamprune import index, record, reduce
    from streamprune.formats.stats_store import StatsStore

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (4, 16))
    y = rng.integers(0, 4, 240)
    x = (centers[y] + rng.normal(0, 1, (240, 16))).astype(np.float32)
    (tmp_path / "shards").mkdir()
    paths = []
    for s in range(2):
        paths.append(str(tmp_path / "shards" / f"feat-{s:06d}.tar"))
        with wds.TarWriter(paths[-1]) as w:
            for i in range(s * 120, s * 120 + 120):
                buf = io.BytesIO()
                np.save(buf, x[i])
                w.write({"__key__": f"{i:08d}", "npy": buf.getvalue(), "cls": int(y[i])})
    run = tmp_path / "run"
    index(paths, run, progress=False)
    summary = record(
        run,
        3,
        workers=1,
        schedule_epochs=6,
        decode="feature_plugins:decode_features",
        model="feature_plugins:mlp",
        loader_workers=1,
        batch_size=32,
        progress=False,
    )
    assert summary.bad_samples == 0 and "(16,)" in summary.inputs and "4 classes" in summary.inputs
    store = StatsStore.open(run / "stats.zarr", mode="r")
    p = store.read("p_true")
    assert np.isfinite(p).all() and (store.labels() == y).all()
    assert p[:, -1].mean() > 0.5  # it learned: separable clusters
    keep = reduce(run, 0.5, "dual-beta", progress=False)
    assert len(keep) == 120
    with pytest.raises(ValueError, match="does not apply with a decode function"):
        record(run, 3, decode="feature_plugins:decode_features", label="json:y", progress=False)


def test_decoder_maps_names_through_the_class_list_and_refuses_unknown_ones():
    classes = Classes(2, ("cat", "dog"), "txt")
    decoder = SampleDecoder(View(1, 8, 8, True), "txt", classes)
    sample = {"__key__": "a", "png": _png(np.zeros((10, 12), np.uint8)), "txt": b"dog"}
    x, y = decoder(sample)
    assert tuple(x.shape) == (1, 8, 8) and y == 1 and float(x.min()) >= -1.0
    with pytest.raises(ValueError, match="'wolf' is not among"):
        decoder({**sample, "txt": b"wolf"})
    with pytest.raises(ValueError, match="no class list"):
        SampleDecoder(View(1, 8, 8, True), "txt")(sample)
