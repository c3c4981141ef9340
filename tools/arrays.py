"""Write two prepared splits as one NumPy file: ``python -m tools.arrays data/prepared out.npz``.

For measuring tools outside the project (the PyTorch airbench93 script in ``benchmarks/``) that
should train on exactly the images the pipeline trains on: ``train_images`` (uint8, N x H x W x 3)
and ``train_labels``, then ``test_images`` and ``test_labels`` from the split named by ``--test``
(``val`` by default, so that the test split is not read while comparing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cifar100_dvc.records import read_split


def split_arrays(prepared_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 3], labels int64 [N]) of one prepared split, in stored order."""
    images, labels = [], []
    for batch_images, batch_labels in read_split(prepared_dir, split, 4096, cache=False).as_numpy_iterator():
        images.append(batch_images)
        labels.append(batch_labels.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.arrays", description="write two prepared splits as one .npz file")
    parser.add_argument("prepared_dir", type=Path, help="prepare's output (data/prepared)")
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--train", default="train", help="the split saved as train_* (default: %(default)s)")
    parser.add_argument("--test", default="val", help="the split saved as test_* (default: %(default)s)")
    args = parser.parse_args(argv)
    train_images, train_labels = split_arrays(args.prepared_dir, args.train)
    test_images, test_labels = split_arrays(args.prepared_dir, args.test)
    np.savez(args.out, train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels)
    print(f"wrote {args.out}: {len(train_images)} {args.train} / {len(test_images)} {args.test} images")


if __name__ == "__main__":
    main()
