"""What every stage's ``main()`` shares: logging, one-line errors, atomic outputs, progress."""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
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


PROJECT_LOGGERS = ("__main__", "stages", "cifar100_dvc", "tools")  # INFO from these; warnings and errors from all


def setup_logging() -> None:
    """Plain ``LEVEL name: message`` lines on stderr: the project's own at INFO, other libraries' (datasets'
    "TensorFlow version available", TensorFlow's "Assets written") only from WARNING up. TensorFlow's C++
    logging is quieted when it is imported (cifar100_dvc/__init__.py)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


# Ctrl-C seen by run_main's handler. Process-wide because signals are: Python drops the
# KeyboardInterrupt a handler raises while a finalizer (``__del__``, a TensorFlow object's
# cleanup) happens to be running, and training would then go on to the end as if nothing came.
_interrupt_received = threading.Event()


def _interrupt(signum, frame):
    _interrupt_received.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came during run_main but its exception was swallowed;
    long loops call it at safe points (training: after every step)."""
    if _interrupt_received.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_remembered() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    _interrupt_received.clear()
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupt_received.clear()  # nothing pending once the stage is over


def run_main(stage_name: str, body: Callable[[], None]) -> None:
    """Run a stage's body; a StageError or an I/O error becomes one ``error:`` line and exit status 1,
    Ctrl-C one line and exit status 130 (also when a finalizer swallowed its exception)."""
    setup_logging()
    try:
        with _interrupt_remembered():
            body()
            raise_if_interrupted()
        return
    except StageError as error:
        message, status = one_line(error), 1
    except KeyboardInterrupt:
        # atomic_output swaps each output in whole, so this holds even mid-write.
        message, status = "interrupted; outputs not yet finished were left as they were", 130
    except Exception as error:
        # A full disk, a file-size limit, a read-only or vanished folder: the user's to fix, and
        # a traceback would not help. Anything else is a bug, and keeps its traceback.
        reason = io_error_reason(error)
        if reason is None:
            raise
        filename = getattr(error, "filename", None)
        where = f"{'cannot write ' if is_write_failure(error) else ''}{filename}: " if filename else ""
        message, status = where + one_line(reason), 1
    # Out of the except block, the failed body's frames (model, tf.data iterators, dvclive) are
    # released; collect them now, while the interpreter is whole, not during its shutdown,
    # where their finalizers print "Exception ignored ... shutting down" tracebacks.
    gc.collect()
    print(f"error: {stage_name}: {message}", file=sys.stderr)
    sys.exit(status)


# Errors that only writing can cause (an OSError's errno): file too large, disk full, quota, read-only.
_WRITE_STRERRORS = {os.strerror(code) for code in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS)}
_STRERRORS = {os.strerror(code) for code in errno.errorcode}


def io_error_reason(error: BaseException) -> str | None:
    """Why an I/O operation failed, if ``error`` is (or was raised from) an OSError or a TensorFlow I/O error."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        if _is_tensorflow_error(seen):
            # TensorFlow reports a failed file operation as '<path>; <strerror>' (the path is a
            # staging name); any other OpError (a shape mismatch, out of memory) is no I/O error.
            reason = str(getattr(seen, "message", seen)).rsplit("; ", 1)[-1]
            return reason if reason in _STRERRORS else None
        # What it was raised from; not what `raise ... from None` hid (a message already made for the user).
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for want of space or of a writable file system (EFBIG, ENOSPC, ...)."""
    return io_error_reason(error) in _WRITE_STRERRORS


def _is_tensorflow_error(error: BaseException) -> bool:
    # tf.errors.OpError, recognized by name: importing TensorFlow here would slow every stage's start.
    return any(cls.__name__ == "OpError" and cls.__module__.startswith("tensorflow.") for cls in type(error).__mro__)


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
    An I/O error inside the block (disk full, file too large) becomes a StageError naming
    ``final_path``, so keep reading outside it.
    """
    final_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in final_path.parent.glob(glob.escape(staging_prefix(final_path)) + "*"):
        log.info("removing %s, left by an earlier run that was killed", stale)
        remove_path(stale)
    staging_dir = Path(tempfile.mkdtemp(prefix=staging_prefix(final_path), dir=final_path.parent))
    staged = staging_dir / final_path.name
    try:
        try:
            yield staged
        except StageError:
            raise
        except Exception as error:
            reason = io_error_reason(error)  # the block only writes: an I/O error is a failed write
            if reason is None:
                raise
            raise StageError(f"cannot write {final_path}: {one_line(reason)}") from None
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
