"""Your own images listed in a CSV file, `path,label` or `path,label,split`, as labelling tools export them.

The rows become a data set with ImageFolder's attributes (`samples`, `targets`, `classes`,
`transform`), so it is checked, split and transformed by the same helpers as a folder of images.
Lines are numbered as an editor numbers them: the header is line 1.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from tunelab.data.files import drop_unreadable, folder_transforms, split_whole, with_transform
from tunelab.data.splits import Splits, log_class_counts, select
from tunelab.errors import ConfigError, require

log = logging.getLogger(__name__)

KEY = "data.dataset.path"
COLUMNS = ("path", "label")
SPLITS = ("train", "val", "test")
HEADER = "path,label or path,label,split"


@dataclass(frozen=True)
class CsvRow:
    """One image of the CSV: its line, its file (relative paths resolved), its label and split (None without a split column)."""

    line: int
    file: str
    label: str
    split: str | None


class CsvImages(Dataset):
    """The images of a CSV with ImageFolder's attributes (`samples` as (file, class index), `targets`,
    `classes`, `class_to_idx`, `transform`) and its loader: RGB images from PIL, then `transform`."""

    def __init__(self, csv_file: Path, samples: list[tuple[str, int]], classes: list[str], transform=None) -> None:
        self.root, self.classes, self.transform = str(csv_file), classes, transform
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = self.imgs = samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from torchvision.datasets.folder import default_loader

        path, target = self.samples[index]
        image = default_loader(path)
        return (image if self.transform is None else self.transform(image)), target


def _csv_file(path) -> Path:
    require(path is not None, f"{KEY} is required: give the CSV file that lists your images, e.g. {KEY}=/data/labels.csv "
                              f"(a header row {HEADER}, then one row per image)")
    file = Path(os.path.expanduser(str(path))).absolute()
    folder = " (that is a folder: data=folder reads a folder of images)" if file.is_dir() else ""
    require(file.is_file(), f"{KEY}={path}: no such file{folder}; expected a CSV file with the header {HEADER}")
    return file


def _row(record: dict, line: int, folder: Path, has_split: bool, shown: str) -> CsvRow:
    cells = {column: (record.get(column) or "").strip() for column in (*COLUMNS, "split")}
    for column in COLUMNS:
        require(cells[column], f"{shown}, line {line}: the row has no {column} (every row needs a path and a label)")
    split = cells["split"] if has_split else None
    require(split is None or split in SPLITS,
            f"{shown}, line {line}: unknown split {split!r}; the split column takes train, val or test")
    return CsvRow(line, str(folder / cells["path"]), cells["label"], split)


def _check_files(rows: list[CsvRow], folder: Path, shown: str) -> None:
    """Every file listed once, and there."""
    first: dict[str, int] = {}
    for row in rows:
        line = first.setdefault(row.file, row.line)
        require(line == row.line, f"{shown}, line {row.line}: {row.file} is listed again (first on line {line}); list every image once")
    missing = [row for row in rows if not os.path.isfile(row.file)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{shown}, line {missing[0].line}: no such file {missing[0].file}{more}. "
                          f"Relative paths are read from the CSV file's folder, {folder}")


def csv_rows(path) -> list[CsvRow]:
    """The rows of the CSV file `path`, checked (the header, every cell, every file there, none twice).

    A bad one is a ConfigError naming the file (as `data.dataset.path=...`) and the line.
    """
    file, shown = _csv_file(path), f"{KEY}={path}"
    try:
        with open(file, newline="", encoding="utf-8-sig") as lines:  # utf-8-sig: spreadsheets write a BOM
            reader = csv.DictReader(lines)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [column for column in COLUMNS if column not in header]
            require(not missing, f"{shown}, line 1: the header ({','.join(header) or 'empty'}) has no column "
                                 f"{' and no '.join(missing)}; the first row must name the columns, {HEADER}")
            reader.fieldnames = header
            rows = [_row(record, reader.line_num, file.parent, "split" in header, shown) for record in reader]
    except OSError as err:
        raise ConfigError(f"{shown}: cannot read it ({err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{shown}: not a UTF-8 text file ({err}); save it as CSV (UTF-8)") from None
    except csv.Error as err:
        raise ConfigError(f"{shown}, line {reader.line_num}: not valid CSV ({err})") from None
    require(rows, f"{shown}: no rows below the header; list one image per row ({HEADER})")
    _check_files(rows, file.parent, shown)
    return rows


def _require_every_class(dataset: CsvImages, rows: str, shown: str, skipped: int) -> None:
    empty = sorted(set(dataset.classes) - {dataset.classes[t] for t in dataset.targets})
    require(not empty, f"{shown}: the {rows} hold no image of the classes {', '.join(empty)}"
                       + (f" ({skipped} unreadable images skipped)" if skipped else "")
                       + "; every split needs images of every label in the CSV")


def _given_splits(whole: CsvImages, plain: CsvImages, rows: list[CsvRow], shown: str, skipped: int) -> Splits:
    """The splits of the split column: train and val rows required, test rows optional."""
    counts, split_of = Counter(row.split for row in rows), {row.file: row.split for row in rows}
    for split in ("train", "val"):
        require(counts[split] > 0, f"{shown}: no row has split {split}; with a split column, train and val rows are "
                                   "required (test rows are optional), or leave the column out and tunelab splits the rows")
    parts = {}
    for split in (s for s in SPLITS if counts[s]):
        index = torch.as_tensor([i for i, (file, _) in enumerate(whole.samples) if split_of[file] == split], dtype=torch.long)
        parts[split] = select(whole if split == "train" else plain, [whole], index)
        _require_every_class(parts[split], f"{split} rows", shown, skipped)
    if "test" not in parts:
        log.warning("%s has train and val rows but none with split test: there is no held-out test split. Add rows with "
                    "split test, or leave out the split column and tunelab splits the rows (data.dataset.test_fraction)", shown)
    return Splits(parts["train"], parts["val"], list(whole.classes), parts.get("test"))


def csv_images(
    path: str | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    augment: bool | str = True,
    skip_bad_files: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Splits:
    """Your own images listed in a CSV file with the header `path,label` or `path,label,split`.

    Paths are relative to the CSV file's folder (or absolute); the classes are the distinct labels,
    sorted (as ImageFolder sorts class folders); other columns are ignored.

    - With a split column (train, val or test on every row): those splits; without test rows there
      is no test split, and the log says so. The fractions are not used.
    - Without one: split stratified into train, val and test by `val_fraction` and `test_fraction`
      (of the whole), the test files drawn first by `split_seed`, the same for every `seed`, as
      `image_folder` splits a root of class folders.

    Every file is checked once up front, as `image_folder` does: a missing file or unreadable image
    is named with its line (the header is line 1), or skipped and counted with `skip_bad_files=True`
    (unreadable images only). Only training images are augmented.
    """
    rows, shown = csv_rows(path), f"{KEY}={path}"
    classes = sorted({row.label for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    whole = CsvImages(_csv_file(path), [(row.file, index[row.label]) for row in rows], classes,
                      folder_transforms(image_size, mean, std, augment))
    skipped = drop_unreadable(whole, skip_bad_files, shown, {row.file: row.line for row in rows})
    plain = with_transform(whole, folder_transforms(image_size, mean, std, False))
    if rows[0].split is not None:
        splits = _given_splits(whole, plain, rows, shown, skipped)
    else:
        _require_every_class(whole, "rows", shown, skipped)
        splits = split_whole(whole, plain, val_fraction, test_fraction, seed, split_seed)
    log_class_counts(splits)
    return splits
