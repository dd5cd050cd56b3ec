"""data=csv: images listed in a CSV file (`path,label` or `path,label,split`), split as given or as
a root of class folders is, every bad row refused naming the file and its line, and a run end to end."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import pytest

from conftest import SMALL, compose_config, run_train
from tunelab import data
from tunelab.errors import ConfigError

ARGS = dict(image_size=8, mean=[0.5] * 3, std=[0.5] * 3)
COLOURS = {"owl": (40, 60, 230), "cat": (230, 40, 40), "dog": (40, 200, 60)}  # listed unsorted: classes are sorted
CLASSES = sorted(COLOURS)


@pytest.fixture(autouse=True, scope="module")
def split_cache(tmp_path_factory):
    """The cached splits go to a folder of this module's own (train.py's subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _photos(folder: Path, per_class: int = 10) -> list[tuple[str, str]]:
    """`per_class` RGB images of each class in folder/images/, PNG and JPEG by turns, each class its
    own colour (a little lighter per image); returns (path relative to folder, label), class by class."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    listed = []
    for label, (r, g, b) in COLOURS.items():
        for i in range(per_class):
            name = f"images/{label}_{i}.{'jpg' if i % 2 else 'png'}"
            Image.new("RGB", (16, 16), (r, g + 3 * i, b)).save(folder / name)
            listed.append((name, label))
    return listed


def _write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _with_splits(listed):
    """Rows path,label,split: of each class, images 0-5 train, 6-7 val, 8-9 test."""
    def split(name: str) -> str:
        i = int(Path(name).stem.rsplit("_", 1)[1])
        return "train" if i < 6 else "val" if i < 8 else "test"

    return [(name, label, split(name)) for name, label in listed]


def _files(dataset) -> set[str]:
    return {p for p, _ in dataset.samples}


def _refusal(**kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        data.csv_images(**ARGS, seed=0, **kwargs)
    return str(caught.value)


def test_a_split_column_gives_exactly_its_rows(tmp_path):
    rows = _with_splits(_photos(tmp_path))
    labels = _write_csv(tmp_path / "labels.csv", ["path", "label", "split"], rows)
    splits = data.csv_images(str(labels), **ARGS, seed=0)
    assert splits.classes == ["cat", "dog", "owl"] == CLASSES
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        assert _files(part) == {str(tmp_path / p) for p, _, s in rows if s == name}
        assert all(Path(p).name.split("_")[0] == splits.classes[t] for p, t in part.samples)  # each image its own label
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    assert "RandomResizedCrop" in {type(t).__name__ for t in splits.train.transform.transforms}
    assert "RandomResizedCrop" not in {type(t).__name__ for t in splits.val.transform.transforms + splits.test.transform.transforms}
    again = data.csv_images(str(labels), **ARGS, seed=1, split_seed=1)  # the seeds do not move given splits
    assert [_files(s) for s in (again.train, again.val, again.test)] == [_files(s) for s in (splits.train, splits.val, splits.test)]
    image, target = splits.val[0]
    assert tuple(image.shape) == (3, 8, 8) and target == splits.val.targets[0]
    assert data.train_size(compose_config(["data=csv", f"data.dataset.path={labels}"]).data.dataset) == 18


def test_without_test_rows_there_is_no_test_split_and_the_log_says_so(tmp_path, caplog):
    rows = [r for r in _with_splits(_photos(tmp_path)) if r[2] != "test"]
    labels = _write_csv(tmp_path / "labels.csv", ["path", "label", "split"], rows)
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        splits = data.csv_images(str(labels), **ARGS, seed=0)
    assert splits.test is None and (len(splits.train), len(splits.val)) == (18, 6)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "no held-out test split" in warning and str(labels) in warning


def test_without_a_split_column_the_rows_are_split_stratified_with_a_fixed_test_split(tmp_path, caplog):
    listed = _photos(tmp_path)
    labels = _write_csv(tmp_path / "labels.csv", ["path", "label"], listed[::-1])
    with caplog.at_level(logging.INFO, logger="tunelab"):
        splits = data.csv_images(str(labels), **ARGS, seed=0)
    parts = [_files(s) for s in (splits.train, splits.val, splits.test)]
    assert set().union(*parts) == {str(tmp_path / p) for p, _ in listed} and sum(map(len, parts)) == 30  # a partition
    assert [len(p) for p in parts] == [18, 6, 6] and splits.classes == CLASSES
    assert Counter(splits.test.targets) == Counter(splits.val.targets) == {0: 2, 1: 2, 2: 2}
    assert any(r.getMessage().startswith("Class counts: train {'cat': 6, 'dog': 6, 'owl': 6}") for r in caplog.records)
    other_seed = data.csv_images(str(labels), **ARGS, seed=1)
    assert _files(other_seed.test) == parts[2] and _files(other_seed.val) != parts[1]
    other_split = data.csv_images(str(labels), **ARGS, seed=0, split_seed=1)
    assert _files(other_split.test) != parts[2]
    assert data.train_size(compose_config(["data=csv", f"data.dataset.path={labels}"]).data.dataset) == 18


def test_paths_are_relative_to_the_csv_files_folder_wherever_the_run_starts(tmp_path, monkeypatch):
    listed = _photos(tmp_path / "set")
    listed[0] = (str(tmp_path / "set" / listed[0][0]), listed[0][1])  # an absolute path too
    _write_csv(tmp_path / "set" / "labels.csv", ["path", "label"], listed)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    splits = data.csv_images("../set/labels.csv", **ARGS, seed=0)
    files = _files(splits.train) | _files(splits.val) | _files(splits.test)
    assert len(files) == 30 and all(Path(f).is_absolute() and Path(f).is_file() for f in files)
    monkeypatch.chdir(tmp_path)  # the files were resolved when the CSV was read
    assert tuple(splits.train[0][0].shape) == (3, 8, 8)


def test_refusals_name_the_csv_file_and_the_line(tmp_path):
    listed = _photos(tmp_path)
    labels = tmp_path / "labels.csv"
    shown = f"data.dataset.path={labels}"

    message = _refusal(path=str(tmp_path / "none.csv"))
    assert f"data.dataset.path={tmp_path / 'none.csv'}: no such file" in message and "path,label" in message
    assert "data.dataset.path is required" in _refusal(path=None)

    _write_csv(labels, ["file", "label"], listed)
    message = _refusal(path=str(labels))
    assert message.startswith(f"{shown}, line 1: the header (file,label) has no column path;")

    _write_csv(labels, ["path", "label", "split"], [*_with_splits(listed)[:3], ("images/ghost.png", "cat", "train")])
    message = _refusal(path=str(labels))
    assert message.startswith(f"{shown}, line 5: no such file {tmp_path / 'images' / 'ghost.png'}.") and str(tmp_path) in message

    rows = _with_splits(listed)
    rows[1] = (rows[1][0], rows[1][1], "validation")
    _write_csv(labels, ["path", "label", "split"], rows)
    assert _refusal(path=str(labels)).startswith(f"{shown}, line 3: unknown split 'validation'; the split column takes train, val or test")

    for missing in ("val", "train"):
        _write_csv(labels, ["path", "label", "split"], [r for r in _with_splits(listed) if r[2] != missing])
        assert _refusal(path=str(labels)).startswith(f"{shown}: no row has split {missing};")

    _write_csv(labels, ["path", "label"], [*listed, listed[4]])
    assert _refusal(path=str(labels)).startswith(f"{shown}, line 32: {tmp_path / listed[4][0]} is listed again (first on line 6)")


def test_an_unreadable_image_is_named_with_its_line_or_skipped(tmp_path, caplog):
    listed = _photos(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image at all")
    labels = _write_csv(tmp_path / "labels.csv", ["path", "label"], [*listed[:7], ("images/broken.png", "cat"), *listed[7:]])
    message = _refusal(path=str(labels))
    assert message.startswith(f"data.dataset.path={labels}, line 9: cannot read image {tmp_path / 'images' / 'broken.png'}: ")
    assert "data.dataset.skip_bad_files=true" in message
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        splits = data.csv_images(str(labels), **ARGS, seed=0, skip_bad_files=True)
    assert sum(len(s) for s in (splits.train, splits.val, splits.test)) == 30
    assert any("Skipped 1 unreadable images" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_train_py_refuses_a_bad_row_with_exit_code_2_and_one_paragraph(tmp_path):
    rows = _with_splits(_photos(tmp_path))
    rows[1] = (rows[1][0], rows[1][1], "VAL")
    labels = _write_csv(tmp_path / "labels.csv", ["path", "label", "split"], rows)
    proc = run_train([*SMALL, "data=csv", f"data.dataset.path={labels}", "logger=none"], cwd=tmp_path, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: data: could not build tunelab.data.csv_images: data.dataset.path={labels}, line 3: "
                      "unknown split 'VAL'; the split column takes train, val or test"]
    assert "Traceback" not in output


@pytest.mark.slow
def test_train_py_trains_and_tests_on_a_csv(tmp_path):
    listed = _photos(tmp_path / "data")  # relative paths, images/..., next to the CSV
    labels = _write_csv(tmp_path / "data" / "labels.csv", ["path", "label"], listed)
    args = [*SMALL, "data=csv", f"data.dataset.path={labels}", "model=mobilenet_v3_small", "data.image_size=32",
            "trainer.max_epochs=1", "logger=none"]
    proc = run_train(args, cwd=tmp_path, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Class counts: train {'cat': 6, 'dog': 6, 'owl': 6}; val {'cat': 2, 'dog': 2, 'owl': 2}" in output
    assert "Test (epoch 1" in output
