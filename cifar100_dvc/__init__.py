"""cifar100-dvc's library: what the DVC stages (``stages/``), the user tools (``tools/``) and the
tests share. Nothing here imports a stage or a tool.

The one thing done at import: ask TensorFlow for its oneDNN kernels before anything imports
it. Its x86 wheels switch them on by themselves only on CPUs with AVX512_VNNI/AVX512_BF16/AMX;
on an AVX2-only CPU the default network then trains about 2x slower in float32 (Eigen's kernels).
Every entry point imports this package first (``stages/__init__.py``, ``tools/__init__.py``,
``tests/conftest.py``), so it takes effect everywhere; ``TF_ENABLE_ONEDNN_OPTS=0`` in the
environment still wins.
"""

import os as _os

_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
