"""Write a small synthetic CIFAR-100-like dataset: ``python -m tools.synthetic OUT_DIR``.

It is laid out like the hub repository (parquet files + README.md dataset card), so
``fetch.dataset`` can point at it: a pipeline run with no network and no real data. The
generator itself is library code (cifar100_dvc.synthetic), shared with the tests and the benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar100_dvc.synthetic import make_rows, write_hub_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.synthetic", description="write a synthetic CIFAR-100-like dataset")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=5000, help="train rows (default: %(default)s)")
    parser.add_argument("--test", type=int, default=1000, help="test rows (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    splits = {"train": make_rows(args.train, args.seed, odd_every=50), "test": make_rows(args.test, args.seed + 1, odd_every=50)}
    write_hub_dataset(args.out_dir, splits)
    print(f"wrote {args.out_dir}: {args.train} train / {args.test} test rows")


if __name__ == "__main__":
    main()
