"""cifar100-dvc's user tools, run as ``python -m tools.NAME``: predict (classify image files),
benchmark (measure the pipeline against the notebook), synthetic (write a small dataset).

Tools use the library (``cifar100_dvc``), never a stage module.
"""

# Before the tool module runs: `python -m tools.NAME` imports this package first, and importing
# the library here sets TensorFlow's oneDNN default before anything imports TensorFlow. (Inside a
# tool module, isort would put `import keras` above the library's imports, too late for that.)
import cifar100_dvc  # noqa: F401
