"""What the machine offers the training step: CPU features, oneDNN, GPUs; read, never changed.

TensorFlow's x86 wheels turn oneDNN's kernels on by themselves only on CPUs with AVX512_VNNI,
AVX512_BF16 or AMX; everywhere else (an AVX2-only laptop, say) they run Eigen's, which train the
default network about half as fast in float32. ``cifar100_dvc/__init__.py`` therefore sets
``TF_ENABLE_ONEDNN_OPTS=1`` before TensorFlow is imported, unless the user set it.

``CIFAR100_DVC_CPU_FLAGS`` replaces the flags read from ``/proc/cpuinfo`` (a space- or
comma-separated list such as ``"avx2 fma"``): the tests use it to take the float32 path on a
bfloat16 CPU and the bfloat16 path on any CPU, and a user can use it to see what ``auto`` would
choose elsewhere. It changes decisions, not the instructions the CPU really has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPU_FLAGS_ENV = "CIFAR100_DVC_CPU_FLAGS"
# The flags a training step cares about, in the order the benchmark reports them.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 dot products


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo"), environ: dict | None = None) -> frozenset[str]:
    """The CPU's feature flags: ``CIFAR100_DVC_CPU_FLAGS`` if set, else the first ``flags`` line
    of ``cpuinfo`` (Linux x86); empty where neither can be read."""
    environ = os.environ if environ is None else environ
    override = environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return frozenset(override.replace(",", " ").lower().split())
    return frozenset((_cpuinfo_field(cpuinfo, "flags") or "").split())


def cpu_has_bfloat16(flags: frozenset[str]) -> bool:
    """Whether ``flags`` include native bfloat16 instructions (AVX512_BF16 or AMX)."""
    return any(flag in flags for flag in BFLOAT16_FLAGS)


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels in this process (decided when it was imported)."""
    from tensorflow.python.util import _pywrap_util_port  # the check TensorFlow's own tests use

    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name, or 'unknown'."""
    return _cpuinfo_field(cpuinfo, "model name") or "unknown"


def cpu_family(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's ``cpu family`` (AMD: 25 is Zen 3 or Zen 4, 26 Zen 5), or '?'. A model name such as
    'AMD EPYC' does not tell the generations apart, and their speeds differ by 1.6x."""
    return _cpuinfo_field(cpuinfo, "cpu family") or "?"


def _cpuinfo_field(cpuinfo: Path, name: str) -> str | None:
    """The value of the first ``name`` line of ``cpuinfo`` (the first CPU's), or None where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith(name)), None)
    return line.split(":", 1)[1].strip() if line and ":" in line else None


@dataclass(frozen=True)
class MachineReport:
    """What a result depends on, recorded beside it so two machines' figures can be compared."""

    cpu: str
    cpu_family: str
    cpu_count: int
    cpu_flags: tuple[str, ...]  # those of REPORTED_FLAGS that the CPU has (or the override says)
    cpu_flags_overridden: bool
    onednn: bool
    gpus: int

    def describe(self) -> str:
        flags = " ".join(self.cpu_flags) or "none of " + " ".join(REPORTED_FLAGS)
        override = f" ({CPU_FLAGS_ENV})" if self.cpu_flags_overridden else ""
        return (
            f"{self.cpu} (cpu family {self.cpu_family}), {self.cpu_count} cores, flags {flags}{override}; "
            f"oneDNN {'on' if self.onednn else 'off'}; {self.gpus} GPU(s)"
        )


def machine_report() -> MachineReport:
    """The MachineReport of this process."""
    import tensorflow as tf

    flags = cpu_flags()
    return MachineReport(
        cpu=cpu_model_name(),
        cpu_family=cpu_family(),
        cpu_count=os.cpu_count() or 0,
        cpu_flags=tuple(flag for flag in REPORTED_FLAGS if flag in flags),
        cpu_flags_overridden=CPU_FLAGS_ENV in os.environ,
        onednn=onednn_enabled(),
        gpus=len(tf.config.list_physical_devices("GPU")),
    )
