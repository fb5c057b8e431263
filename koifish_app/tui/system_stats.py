"""GPU health through NVML (nvidia-ml-py), or CPU and RAM from /proc when there is no GPU.

No koifish_core import: this is machine state, not training state. One reading costs well under
a millisecond, cheap enough to take every second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class GPUReading:
    name: str
    mem_used: int
    """Bytes."""
    mem_total: int
    """Bytes."""
    util: float | None
    """Percent of time a kernel ran over the last sample period."""
    temp_c: float | None
    power_w: float | None
    power_limit_w: float | None


@dataclass
class SystemReading:
    gpus: list[GPUReading] = field(default_factory=list)
    cpu_percent: float | None = None
    """All cores together, since the previous reading."""
    ram_used: int | None = None
    """Bytes (MemTotal - MemAvailable)."""
    ram_total: int | None = None
    note: str | None = None
    """Why GPU numbers are missing, when they are."""


class SystemStats:
    """Call read() once a second; it never raises (a broken driver shows as a note)."""

    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self._nvml = None
        self._handles: list = []
        self._note: str | None = None
        self._cpu_prev: tuple[int, int] | None = None
        self._init_nvml()

    def _init_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
            if not self._handles:
                self._note = "NVML: no GPU"
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self._note = f"no GPU ({type(e).__name__})" if not str(e) else f"no GPU: {e}"

    def read(self) -> SystemReading:
        out = SystemReading(note=self._note)
        for handle in self._handles:
            try:
                out.gpus.append(self._gpu(handle))
            except Exception as e:  # a GPU that fell off the bus must not take the dashboard with it
                out.note = f"NVML: {e}"
        out.cpu_percent = self._cpu_percent()
        out.ram_used, out.ram_total = self._ram()
        return out

    def _gpu(self, handle) -> GPUReading:
        nv = self._nvml

        def maybe(fn, scale=1.0):
            try:
                return fn() * scale
            except Exception:  # NVMLError_NotSupported on some boards (power on MIG, temp on VMs)
                return None

        name = nv.nvmlDeviceGetName(handle)
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        return GPUReading(
            name=name.decode() if isinstance(name, bytes) else str(name),
            mem_used=int(mem.used), mem_total=int(mem.total),
            util=maybe(lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu),
            temp_c=maybe(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
            power_w=maybe(lambda: nv.nvmlDeviceGetPowerUsage(handle), 1e-3),  # milliwatts
            power_limit_w=maybe(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(handle), 1e-3))

    def _cpu_percent(self) -> float | None:
        try:
            with open(os.path.join(self.proc, "stat")) as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already inside user/nice
        prev, self._cpu_prev = self._cpu_prev, (idle, total)
        if prev is None or total <= prev[1]:
            return None
        return 100.0 * (1.0 - (idle - prev[0]) / (total - prev[1]))

    def _ram(self) -> tuple[int | None, int | None]:
        info = {}
        try:
            with open(os.path.join(self.proc, "meminfo")) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("MemTotal", "MemAvailable"):
                        info[key] = int(rest.split()[0]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            return None, None
        if "MemTotal" not in info or "MemAvailable" not in info:
            return None, None
        return info["MemTotal"] - info["MemAvailable"], info["MemTotal"]
