"""What the benchmarks measure with: wall time and peak memory of phases and steps, on CPU (the kernel's peak RSS)
or CUDA (max_memory_allocated)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

# glibc serves allocations below its (dynamic, up to 32 MiB) mmap threshold from heaps that keep freed
# blocks: after a checkpointed backward, RSS then overstates live tensors by about 1 GiB on the default
# model (sft T=512 mb=2: 2824 MiB default vs 1781 MiB with this setting). A fixed 64 KiB threshold returns
# every freed tensor to the OS, so RSS follows live memory, as cuda.max_memory_allocated does on a GPU.
GLIBC_MMAP_THRESHOLD = 65536


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssFile, ...); None where the file or the field is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> None:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS: "5" to /proc/self/clear_refs (Linux >= 4.0).
    OSError where that is not allowed."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_mb(field: str) -> float:
    kib = status_kib(field)
    if kib is None:
        raise OSError(f"/proc/self/status has no {field}")
    return kib / 1024


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class MemoryMeter:
    """Peak memory (MiB) since the last `reset`, plus running peaks for any number of open spans.

    CPU: VmHWM, which writing "5" to /proc/self/clear_refs resets to the current RSS (Linux >= 4.0); where
    that is not allowed, a thread samples VmRSS every 5 ms instead. CUDA: max_memory_allocated.
    """

    def __init__(self, device: str):
        self.device = device
        self.spans: list[dict] = []
        self.method = "cuda.max_memory_allocated" if device == "cuda" else "VmHWM"
        self._sampled = 0.0
        if device != "cuda":
            try:
                self._clear()
            except OSError:
                self.method = "VmRSS sampled every 5 ms"
                threading.Thread(target=self._sample, daemon=True).start()

    def current_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return _status_mb("VmRSS")

    def _sample(self) -> None:
        while True:
            self._sampled = max(self._sampled, self.current_mb())
            time.sleep(0.005)

    def _clear(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.method == "VmHWM":
            reset_peak_rss()
        else:
            self._sampled = self.current_mb()

    def peak_mb(self) -> float:
        """Peak since the last reset."""
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        if self.method == "VmHWM":
            return _status_mb("VmHWM")
        return max(self._sampled, self.current_mb())

    def reset(self) -> None:
        peak = self.peak_mb()
        for span in self.spans:
            span["peak"] = max(span["peak"], peak)
        self._clear()

    @contextlib.contextmanager
    def span(self):
        """Yields a dict whose "peak" is the peak memory over the `with` block, resets inside included."""
        span = {"peak": 0.0}
        self.reset()
        self.spans.append(span)
        try:
            yield span
        finally:
            span["peak"] = max(span["peak"], self.peak_mb())
            # by identity: list.remove compares dicts by value, and a nested span whose peak equals its
            # parent's would remove the parent instead
            self.spans = [s for s in self.spans if s is not span]


class Phases:
    """Time and peak memory of named phases; a phase opened inside another pauses the outer one's clock.

    Open a phase with `with phases(name):`, or let a trainer report it: Phases is a phase listener
    (align.trainers.phases), so `on_phase_start(name)` / `on_phase_end(name)` open and close the same phase.
    """

    def __init__(self, meter: MemoryMeter, device: str):
        self.meter, self.device = meter, device
        self.result: dict[str, dict[str, float]] = {}
        self._open: list[str] = []
        self._reported: list[tuple[str, contextlib.ExitStack]] = []

    def on_phase_start(self, name: str) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(self(name))
        self._reported.append((name, stack))

    def on_phase_end(self, name: str) -> None:
        opened, stack = self._reported.pop()
        if opened != name:
            raise RuntimeError(f"phase {name!r} ended while {opened!r} was open")
        stack.close()

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        self._open.append(name)
        try:
            with self.meter.span() as span:
                yield
        finally:
            sync(self.device)
            self._open.pop()
            elapsed = time.perf_counter() - start
            nested = sum(v["time_s"] for v in self.result.values() if v["inside"] == name)
            self.result[name] = {"time_s": elapsed - nested, "peak_mb": span["peak"], "inside": self._open[-1] if self._open else None}

    def table(self) -> dict[str, dict[str, float]]:
        return {k: {"time_s": round(v["time_s"], 3), "peak_mb": round(v["peak_mb"], 1)} for k, v in self.result.items()}


class PeakRSS:
    """Peak RSS over a block: the kernel's VmHWM after a reset, else a 1 ms sampling thread."""

    def __init__(self):
        self.method = "sampled"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        try:
            reset_peak_rss()
            if status_kib("VmHWM") is not None:
                self.method = "VmHWM"
        except OSError:
            pass
        self.peak = rss_bytes()
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self.method == "VmHWM":
            self.peak = max(self.peak, (status_kib("VmHWM") or 0) * 1024)
