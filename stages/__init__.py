"""cifar100-dvc's DVC stages: one module per stage of dvc.yaml, run as ``python -m stages.NAME``.

Nothing imports a stage module: what stages, tools and tests share lives in ``cifar100_dvc``.
"""

# Before the stage module runs: `python -m stages.NAME` imports this package first, and importing
# the library here sets TensorFlow's oneDNN default before anything imports TensorFlow. (Inside a
# stage module, isort would put `import keras` above the library's imports, too late for that.)
import cifar100_dvc  # noqa: F401
