"""What every stage's ``main()`` shares: logging, one-line errors, atomic outputs, progress."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class StageError(Exception):
    """A problem the user can fix (bad input, bad params); reported as one line, exit 1."""


def one_line(text: object) -> str:
    """``text`` folded onto one line, for error messages built from library exceptions."""
    return " ".join(str(text).split())


def setup_logging() -> None:
    """Plain ``LEVEL name: message`` lines on stderr; quiet TensorFlow's C++ start-up chatter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_main(stage_name: str, body: Callable[[], None]) -> None:
    """Run a stage's body; a StageError becomes one ``error:`` line and exit status 1."""
    setup_logging()
    try:
        body()
    except StageError as error:
        print(f"error: {stage_name}: {one_line(error)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # atomic_output swaps each output in whole, so this holds even mid-write.
        print(f"error: {stage_name}: interrupted; outputs not yet finished were left as they were", file=sys.stderr)
        sys.exit(130)


STAGING_MARK = ".partial-"  # staging folders are ".<output name>.partial-XXXXXXXX"; .gitignore and .dvcignore hide them


def staging_prefix(final_path: Path) -> str:
    """The name prefix of ``final_path``'s staging folders, beside it."""
    return f".{final_path.name}{STAGING_MARK}"


@contextlib.contextmanager
def atomic_output(final_path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; swap it in for ``final_path`` only on success.

    Works for files and directories. Until the swap, ``final_path`` stays as it was (the
    previous complete output, or absent): an exception, Ctrl-C or a kill never leaves it
    half-written or missing. A kill -9 leaves a staging folder behind; the next run for the
    same output deletes it first. That is safe because two runs never write one output at
    once: DVC holds its repository lock for the whole of ``dvc repro``/``dvc exp run``.
    """
    final_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in final_path.parent.glob(glob.escape(staging_prefix(final_path)) + "*"):
        log.info("removing %s, left by an earlier run that was killed", stale)
        remove_path(stale)
    staging_dir = Path(tempfile.mkdtemp(prefix=staging_prefix(final_path), dir=final_path.parent))
    staged = staging_dir / final_path.name
    try:
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written for {final_path}")
        if (final_path.is_dir() or staged.is_dir()) and (final_path.exists() or final_path.is_symlink()):
            # os.replace swaps files atomically but cannot replace a non-empty directory (or a
            # file by a directory): move the old one into the staging folder, deleted below.
            os.replace(final_path, staging_dir / f".{final_path.name}.previous")  # never the staged name
        os.replace(staged, final_path)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def progress(items: Iterable[T], total: int, description: str, every: int = 0) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal; elsewhere log a plain line every ``every`` items."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=description, unit="img", unit_scale=True)
        return
    every = every or max(1, total // 10)
    for done, item in enumerate(items, start=1):
        yield item
        if done % every == 0 or done == total:
            log.info("%s: %d/%d", description, done, total)
