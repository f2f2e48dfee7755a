"""Each on-disk format round-trips through its own reader, and every reader checks its header:
a file of a newer streamprune is a `NewerFormatError`, a file of another format a `DamagedRunError`.
No Ray: the index is written in this process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from streamprune.errors import DamagedRunError, NewerFormatError
from streamprune.formats.classes import Classes
from streamprune.formats.headers import KEEP_FORMAT, SCORES_FORMAT, STATS_FORMAT, check_format, header
from streamprune.formats.index import Index
from streamprune.formats.keeplist import KeepList
from streamprune.formats.rundir import RunDir
from streamprune.formats.scores_store import ScoresStore
from streamprune.scoring.columns import LABEL, LABEL_MISSING, NO_GROUP


def _bump_version(path, version=2):
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "version": version}))


def test_check_format_reads_its_own_versions_and_refuses_the_rest():
    doc = header(STATS_FORMAT)
    assert check_format(doc, STATS_FORMAT, "x") is doc and doc["version"] == 1 and "streamprune_version" in doc
    with pytest.raises(NewerFormatError, match="'f' was written by a newer streamprune.*version 2"):
        check_format({**doc, "version": 2}, STATS_FORMAT, "'f'")
    with pytest.raises(DamagedRunError, match="is not a streamprune-keep file"):
        check_format(doc, KEEP_FORMAT, "f")
    for bad in (None, "1", 0, True):
        with pytest.raises(DamagedRunError, match="no valid format version"):
            check_format({**doc, "version": bad}, STATS_FORMAT, "f")
    with pytest.raises(DamagedRunError, match="not a JSON object"):
        check_format([1], STATS_FORMAT, "f")
    assert check_format({}, SCORES_FORMAT, "f") == {}  # scores of 0.1.0 carry no header
    with pytest.raises(DamagedRunError):
        check_format({}, STATS_FORMAT, "f")


def test_scores_store_round_trip_and_header(tmp_path):
    path = tmp_path / "scores.zarr"
    store = ScoresStore.create(path, n=10, block_rows=4)
    dual = np.linspace(0, 1, 4)
    store.write_block(4, 8, {"dual": dual, "id_hi": np.arange(4, dtype=np.uint64), LABEL: np.array([0, 1, -1, 2])})
    store.set_attrs({"scores": ["dual"], "block_rows": 4})
    again = ScoresStore.open(path)
    assert again.scores == ["dual"] and again.block_rows == 4 and LABEL in again
    assert np.array_equal(again.read("dual", slice(4, 8)), dual)
    assert np.isnan(again.read("dual", slice(0, 4))).all()  # never written: missing
    assert again.read(LABEL).tolist() == [LABEL_MISSING] * 4 + [0, 1, -1, 2] + [LABEL_MISSING] * 2
    assert (again.read("sel_group") == NO_GROUP).all()
    assert again.attrs["format"] == SCORES_FORMAT.name and again.attrs["version"] == 1
    assert sorted(p.name for p in (path / "dual" / "c").iterdir()) == ["1"]  # one block, one chunk

    zarr.open_group(str(path), mode="r+").attrs.update({"version": 2})
    with pytest.raises(NewerFormatError, match="scores .* newer streamprune"):
        ScoresStore.open(path)
    group = zarr.open_group(str(path), mode="r+")
    for key in ("format", "version"):
        del group.attrs[key]
    assert ScoresStore.open(path).scores == ["dual"]  # written by 0.1.0: no header
    with pytest.raises(FileNotFoundError, match="run `streamprune reduce` first"):
        ScoresStore.open(tmp_path / "none.zarr")


def test_index_round_trip_without_ray(make_index, uneven_shards, tmp_path):
    paths, _ = uneven_shards
    written = make_index(paths, tmp_path / "run")
    index = Index(RunDir(tmp_path / "run").index)
    assert (index.n_samples, index.names, index.fingerprint) == (written.n_samples, written.names, written.fingerprint)
    assert np.array_equal(index.shard_offset, written.shard_offset)
    assert index.keys(0) == written.keys(0)
    _bump_version(Path(RunDir(tmp_path / "run").index) / "manifest.json")
    with pytest.raises(NewerFormatError):
        Index(RunDir(tmp_path / "run").index)


def test_keep_list_round_trip(tmp_path):
    pairs = [("a.tar", "k1"), ("b.tar", "k\n2"), ("a.tar", "k0")]
    keep = KeepList.from_keys(pairs, fingerprint="f" * 32)
    keep.save(tmp_path / "keep")
    again = KeepList.load(tmp_path / "keep")
    assert len(again) == 3 and all(p in again for p in pairs) and ("a.tar", "k2") not in again
    assert again.names == ["a.tar", "b.tar"] and again.kept_count("a.tar") == 2
    assert again.fingerprint == "f" * 32 and np.array_equal(again.ids(), keep.ids())
    _bump_version(tmp_path / "keep" / "manifest.json")
    with pytest.raises(NewerFormatError, match="newer streamprune"):
        KeepList.load(tmp_path / "keep")


def test_a_list_of_keys_from_no_index_saves_and_loads(tmp_path):
    keep = KeepList.from_keys([("a.tar", "k1"), ("b.tar", "k2")])  # no fingerprint: drawn from no index
    keep.save(tmp_path / "keep")
    again = KeepList.load(tmp_path / "keep")
    assert again.fingerprint is None and len(again) == 2 and ("b.tar", "k2") in again
    manifest = tmp_path / "keep" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"method": "user"', '"method": null'))
    with pytest.raises(DamagedRunError, match="method=None is not a string"):  # only the fingerprint may be null
        KeepList.load(tmp_path / "keep")


def test_class_list_round_trip(tmp_path):
    classes = Classes(3, ("cat", "dog", "emu"), label="json:kind", counts=(5, 0, 2))
    path = Path(classes.save(tmp_path))
    assert str(path) == RunDir(tmp_path).classes
    assert Classes.load(tmp_path) == classes and Classes.load(tmp_path / "none") is None
    _bump_version(path)
    with pytest.raises(NewerFormatError):
        Classes.load(tmp_path)
    path.write_text("{")
    with pytest.raises(DamagedRunError, match="classes.json' is damaged"):
        Classes.load(tmp_path)


CLASS_DOC_FIELDS = {  # an edited field of a valid classes.json -> the field the error names
    "names as one string": ({"names": "abc"}, "names"),
    "names not strings": ({"names": [1, 2, 3]}, "names"),
    "names repeated": ({"names": ["a", "a", "b"]}, "names"),
    "an empty name": ({"names": ["a", "", "b"]}, "names"),
    "names fewer than classes": ({"names": ["a", "b"]}, "names"),
    "counts as a string": ({"counts": "123"}, "counts"),
    "a negative count": ({"counts": [1, -1, 2]}, "counts"),
    "a fractional count": ({"counts": [1.5, 2, 3]}, "counts"),
    "a boolean count": ({"counts": [True, 1, 2]}, "counts"),
    "counts fewer than classes": ({"counts": [1, 2]}, "counts"),
    "num_classes a string": ({"num_classes": "3"}, "num_classes"),
    "num_classes a float": ({"num_classes": 3.0}, "num_classes"),
    "num_classes a boolean": ({"num_classes": True}, "num_classes"),
    "num_classes zero": ({"num_classes": 0, "names": None, "counts": None}, "num_classes"),
    "num_classes missing": ({"num_classes": None}, "num_classes"),
    "label not a string": ({"label": 5}, "label"),
}


@pytest.mark.parametrize("case", list(CLASS_DOC_FIELDS))
def test_a_class_list_with_a_field_of_the_wrong_type_is_refused_naming_file_and_field(tmp_path, case):
    from streamprune.errors import InputError

    path = Path(Classes(3, ("a", "b", "c"), counts=(5, 0, 2)).save(tmp_path))
    edit, field = CLASS_DOC_FIELDS[case]
    doc = {k: v for k, v in {**json.loads(path.read_text()), **edit}.items() if v is not None or k != "num_classes"}
    path.write_text(json.dumps(doc))
    where = f"{str(path)!r}: {field}"
    with pytest.raises(DamagedRunError, match=f"^class list {where}: must be ") as info:
        Classes.load(tmp_path)
    assert not isinstance(info.value, InputError)
    with pytest.raises(InputError, match=f"^class list {where}: must be "):  # the user's own file
        Classes.from_file(path)


def test_a_user_class_list_without_names_is_refused_naming_the_file(tmp_path):
    from streamprune.errors import InputError

    for name, text in (("c.json", "[]"), ("c.txt", "\n  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=f"class list {str(tmp_path / name)!r}: names no class"):
            Classes.from_file(tmp_path / name)
