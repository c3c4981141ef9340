"""cifar100-dvc: one module per DVC stage plus the few shared modules they import.

The one thing done at import: ask TensorFlow for its oneDNN kernels before anything imports
it. Its x86 wheels switch them on by themselves only on CPUs with AVX512_VNNI/AVX512_BF16/AMX;
on an AVX2-only CPU the default network then trains about 2x slower in float32 (Eigen's kernels).
Every entry point (the stages, predict, export, the benchmark, the tests) imports this package
first, so it takes effect everywhere; ``TF_ENABLE_ONEDNN_OPTS=0`` in the environment still wins.
"""

import os as _os

_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
