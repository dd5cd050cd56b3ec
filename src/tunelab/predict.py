"""Classify images with a trained model: the top classes of each, with their probabilities.

    python -m tunelab.predict models:/tunelab@champion photos/                 # every image under photos/
    python -m tunelab.predict runs:/RUN_ID/model a.jpg b.png --top-k 3
    python -m tunelab.predict outputs/2026-12-02/10-00-00/best.pt 'shots/*.jpg' --out preds.csv

MODEL is an MLflow model URI (`runs:/<id>/model`, `models:/<name>@champion`), a run id (its logged
model, else its best.pt) or a checkpoint file. IMAGES are files, folders (searched recursively for
image files) and glob patterns. Each image is prepared as the model was validated (its stored input
size and normalization), in batches, on the GPU when there is one. `--out` writes a CSV: path,
class, probability and the top k as `class:probability` pairs. Unreadable files are listed and
skipped; the exit status is 0 when every image was classified, 1 when some were skipped, 2 on bad
input (no model, no image).
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import sys
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS  # the endings ImageFolder takes

from tunelab import trained
from tunelab.errors import ConfigError, ReportedError, require
from tunelab.inference import Classifier, decode
from tunelab.tracking import open_store, resolve_tracking_uri



def image_paths(arguments: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files named by `arguments` (files, folders, globs), in order and without repeats,
    and the arguments that name nothing, each with why."""
    found, missing, seen = [], [], set()
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.is_file():
            paths = [path]
        elif glob.has_magic(argument):
            paths = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            paths = []
        if not paths:
            missing.append((argument, "no such file" if not path.is_dir() else "no image files in this folder"))
        for p in paths:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                found.append(p)
    return found, missing


def classify_files(classifier: Classifier, paths: list[Path], batch_size: int, top_k: int, progress: bool):
    """(rows of (path, top k), unreadable (path, why)): every readable file classified, batch by batch."""
    from tqdm.auto import tqdm

    rows, bad = [], []
    bar = tqdm(total=len(paths), unit="img", disable=not progress or len(paths) < 2, file=sys.stderr)
    for start in range(0, len(paths), batch_size):
        batch, kept = [], []
        for path in paths[start:start + batch_size]:
            try:
                batch.append(classifier.info.transform(decode(path)))
                kept.append(path)
            except (ValueError, OSError) as err:
                bad.append((path, str(err)))
        if batch:
            probabilities = classifier.probabilities(torch.stack(batch))
            rows += list(zip(kept, classifier.top_k(probabilities, top_k)))
        bar.update(len(paths[start:start + batch_size]))
    bar.close()
    return rows, bad


def write_csv(rows, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "probability", "top_k"])
        for path, top in rows:
            writer.writerow([str(path), top[0][0], f"{top[0][1]:.6f}", ";".join(f"{name}:{p:.6f}" for name, p in top)])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tunelab.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="runs:/<id>/model, models:/<name>@champion, a run id, or a checkpoint file (best.pt)")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) and glob patterns")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to give per image (default: 3)")
    parser.add_argument("--out", default=None, help="write the predictions to this CSV file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument("--tracking-uri", default=None, help="the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)")
    parser.add_argument("--quiet", action="store_true", help="no line per image (with --out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    try:
        require(args.top_k >= 1, f"--top-k must be at least 1, got {args.top_k}")
        require(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}")
        paths, missing = image_paths(args.images)
        require(paths, "no image found in " + "; ".join(f"{a} ({why})" for a, why in missing))
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
        client = None
        if not Path(args.model).expanduser().is_file():
            client, _ = open_store(resolve_tracking_uri(args.tracking_uri))
        classifier = trained.load(args.model, device, client).classifier
    except (ConfigError, ReportedError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    rows, bad = classify_files(classifier, paths, args.batch_size, args.top_k, progress=True)
    if not args.quiet:
        for path, top in rows:
            print(f"{path}\t" + "  ".join(f"{name} {p:.4f}" for name, p in top))
    if args.out:
        write_csv(rows, Path(args.out))
        print(f"Wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    skipped = [(str(p), why) for p, why in bad] + missing
    if skipped:
        print(f"Skipped {len(skipped)} (not classified):", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
