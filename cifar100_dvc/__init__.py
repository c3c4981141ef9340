"""cifar100-dvc's library: what the DVC stages (``stages/``), the user tools (``tools/``) and the
tests share. Nothing here imports a stage or a tool.

The one thing done at import: settings TensorFlow reads when it is first imported, so they must
be in place before anything imports it. Every entry point imports this package first
(``stages/__init__.py``, ``tools/__init__.py``, ``tests/conftest.py``), so they take effect
everywhere; a value already in the environment wins.

- ``TF_ENABLE_ONEDNN_OPTS=1``: oneDNN's kernels. TensorFlow's x86 wheels switch them on by
  themselves only on CPUs with AVX512_VNNI/AVX512_BF16/AMX; on an AVX2-only CPU the default
  network then trains about 2x slower in float32 (Eigen's kernels).
- ``TF_CPP_MIN_LOG_LEVEL=2``: TensorFlow's C++ info and warning lines (the CPU instructions it was
  not built for, buffer sizes, ...) would otherwise open every stage's output; errors still print.
  TensorFlow 2.21 logs a few lines while its libraries load (the oneDNN notice, twice, and absl's
  "All log messages before absl::InitializeLog()" preamble), before any setting is read, so at
  that level the import of ``tensorflow`` itself runs with the process's stderr pointed at
  /dev/null (``_QuietTensorFlowImport``). Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see all of it again.
"""

import contextlib as _contextlib
import os as _os
import sys as _sys
from importlib.abc import MetaPathFinder as _MetaPathFinder
from importlib.machinery import PathFinder as _PathFinder

_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@_contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 (where C++ code writes) pointed at /dev/null inside the block."""
    _sys.stderr.flush()
    saved = _os.dup(2)
    devnull = _os.open(_os.devnull, _os.O_WRONLY)
    try:
        _os.dup2(devnull, 2)
        yield
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)
        _os.close(devnull)


class _QuietTensorFlowImport(_MetaPathFinder):
    """Finds ``tensorflow`` once, with a loader that runs its import with stderr silenced (see the module doc)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        _sys.meta_path.remove(self)  # once: later lookups take the usual path
        spec = _PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            loader = spec.loader

            class _Quiet(type(loader)):
                def exec_module(self, module):
                    with _stderr_to_devnull():
                        super().exec_module(module)

            loader.__class__ = _Quiet
        return spec


if _os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("", "0") and "tensorflow" not in _sys.modules:
    _sys.meta_path.insert(0, _QuietTensorFlowImport())
