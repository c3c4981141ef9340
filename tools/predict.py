"""Classify image files with the trained model: ``python -m tools.predict IMAGE_OR_DIR ...``.

Each file (PNG, JPEG, ...; any mode or size) is converted to the model's own input size, in RGB,
exactly as ``prepare`` converts the dataset, then the model's top-k classes are printed with their
probabilities.
A directory classifies every image file in it. A file that cannot be read gets a one-line
error on stderr and the others are still classified; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar100_dvc.common import StageError, one_line, setup_logging
from cifar100_dvc.images import decode_image, to_rgb_uint8
from cifar100_dvc.inference import image_size_of, load_model, predict_probabilities
from cifar100_dvc.paths import ProjectPaths

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass(frozen=True)
class Prediction:
    file: str
    top_k: list[tuple[str, float]] | None = None  # (class name, probability), best first
    error: str | None = None


def expand_inputs(arguments: list[Path]) -> list[Path]:
    """Files as given; a directory becomes its image files (by suffix), sorted."""
    files = []
    for argument in arguments:
        if argument.is_dir():
            files += sorted(path for path in argument.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(argument)
    return files


def load_image(path: Path, size: int) -> np.ndarray | str:
    """The file as ``size`` x ``size`` RGB uint8 pixels, converted as ``prepare`` converts, or why it cannot be read."""
    try:
        pixels, _ = to_rgb_uint8(decode_image(path.read_bytes()), size)
        return pixels
    except (OSError, ValueError) as error:
        return one_line(error)


def top_k_classes(probabilities: np.ndarray, class_names: list[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row of [N, C] probabilities, the k most likely (class, probability), best first."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(class_names[c], float(row[c])) for c in indices] for row, indices in zip(probabilities, order)]


def predict_files(model, files: list[Path], k: int = 5, tta_flip: bool = False, tta_translate: int = 0) -> list[Prediction]:
    """A Prediction for each file, in order: its top-k classes, or its error."""
    from cifar100_dvc.network import class_names_of

    size = image_size_of(model)
    loaded = [load_image(path, size) for path in files]
    readable = [pixels for pixels in loaded if not isinstance(pixels, str)]
    ranked = iter([])
    if readable:
        probabilities = predict_probabilities(model, np.stack(readable), 256, tta_flip, tta_translate)
        ranked = iter(top_k_classes(probabilities, class_names_of(model), k))
    return [
        Prediction(str(path), error=pixels) if isinstance(pixels, str) else Prediction(str(path), top_k=next(ranked))
        for path, pixels in zip(files, loaded)
    ]


def format_text(prediction: Prediction) -> str:
    return f"{prediction.file}: " + ", ".join(f"{name} {probability:.1%}" for name, probability in prediction.top_k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or directories of images")
    parser.add_argument("--model", type=Path, default=ProjectPaths().model_file, help="a .keras model (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default: %(default)s)")
    parser.add_argument("--tta-flip", action="store_true", help="average with the mirrored image, as evaluate does")
    parser.add_argument(
        "--tta-translate", type=int, default=0, metavar="PIXELS", help="add two views shifted by PIXELS, as evaluate does"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines of text")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if not 0 <= args.tta_translate <= 4:
        parser.error("--tta-translate must be 0 to 4 pixels")
    setup_logging()
    try:
        model = load_model(args.model)
    except StageError as error:
        print(f"error: predict: {one_line(error)}", file=sys.stderr)
        return 1
    files = expand_inputs(args.inputs)
    if not files:
        print("error: predict: no image files found in " + ", ".join(map(str, args.inputs)), file=sys.stderr)
        return 1
    results = predict_files(model, files, args.top_k, args.tta_flip, args.tta_translate)
    for result in results:
        if result.error:
            print(f"error: predict: {result.file}: {result.error}", file=sys.stderr)
    if args.json:
        payload = [
            {"file": r.file, "error": r.error}
            if r.error
            else {"file": r.file, "predictions": [{"class": name, "probability": p} for name, p in r.top_k]}
            for r in results
        ]
        print(json.dumps(payload, indent=2))
    else:
        for result in results:
            if not result.error:
                print(format_text(result))
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
