"""Energy of a measured span, from the best source this machine has, always named beside the figure.

Sources, best first: the CPU packages' RAPL counters (Linux powercap, `/sys/class/powercap/intel-rapl:N`, which AMD
CPUs expose too, readable by root or where the files are made readable), the GPU board's energy counter (NVML, via
the `nvidia-ml-py` package, when the engine runs on CUDA), else an **estimate**: the process's CPU time times a
stated power per busy core. Virtual machines (such as the 2-core development machines) expose no counter, so there
every figure is the estimate and says so. codecarbon and zeus read the same counters; they are not used because
codecarbon brings pandas and a tracking service, and zeus targets GPUs: the reads below are the few lines they do.

The estimate counts only the cores the process keeps busy (every engine benchmarked runs in this process, so the
peers are charged the same way), not idle, uncore or memory power: a lower bound with an assumed constant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
# Per busy core: a 280 W, 64-core server EPYC is ~4.4 W a core at full load, a 65 W 8-core desktop part ~8 W;
# 6 W sits between them. Stated with every estimate, so a reader can rescale it for their own CPU.
WATTS_PER_CORE = 6.0


@dataclass
class EnergySpan:
    """Joules spent between `EnergyMeter.start()` and `.stop()`, and how they were obtained."""

    joules: float
    seconds: float
    method: str


class RaplCounters:
    """The package domains' cumulative energy (µJ), summed, with each counter's wrap-around undone."""

    def __init__(self, root: Path = POWERCAP):
        self.domains = []
        for d in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
            name = (d / "name").read_text().strip() if (d / "name").is_file() else ""
            if ":" in d.name[len("intel-rapl:"):] or not name.startswith("package"):
                continue  # sub-domains (core, uncore, dram) are inside their package's figure
            energy, limit = d / "energy_uj", d / "max_energy_range_uj"
            try:
                int(energy.read_text())
                self.domains.append((energy, int(limit.read_text()) if limit.is_file() else 0))
            except (OSError, ValueError):  # unreadable (not root): this source is not available
                self.domains = []
                return

    def read(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self.domains]

    def joules(self, before: list[int], after: list[int]) -> float:
        total = 0
        for (_, limit), a, b in zip(self.domains, before, after):
            total += b - a if b >= a else b + limit - a  # one wrap at most: spans are seconds, wraps are minutes
        return total / 1e6


class EnergyMeter:
    """`start()` / `stop(token)` around a span; the source is chosen once, at construction."""

    def __init__(self, device: str = "cpu", powercap: Path = POWERCAP):
        self._rapl = RaplCounters(powercap)
        self._nvml = _nvml_handle(device) if device.startswith("cuda") else None
        if self._nvml is not None:
            self.method = "measured: NVML board energy counter (GPU)"
        elif self._rapl.domains:
            self.method = f"measured: RAPL package energy counters ({len(self._rapl.domains)} package(s))"
        else:
            self.method = (f"estimate: process CPU time × {WATTS_PER_CORE:g} W per busy core (no energy counter "
                           "on this machine)")

    def start(self) -> tuple:
        return time.perf_counter(), time.process_time(), self._read()

    def stop(self, token: tuple) -> EnergySpan:
        wall, cpu, counters = token
        now = self._read()
        seconds = time.perf_counter() - wall
        if self._nvml is not None:
            joules = (now - counters) / 1e3  # mJ
        elif self._rapl.domains:
            joules = self._rapl.joules(counters, now)
        else:
            joules = (time.process_time() - cpu) * WATTS_PER_CORE
        return EnergySpan(joules, seconds, self.method)

    def _read(self):
        if self._nvml is not None:
            import pynvml

            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml)
        return self._rapl.read() if self._rapl.domains else None


def _nvml_handle(device: str):
    """The GPU's NVML handle (`cuda` or `cuda:N`), or None without `nvidia-ml-py` or a driver that counts energy."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.partition(":")[2] or 0))
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        return handle
    except Exception:  # noqa: BLE001 - no package, no driver, no counter: the next source is used
        return None
