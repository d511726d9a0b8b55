"""Peak resident memory of this process, read from Linux's /proc: how the memory checks measure on CPU.

`phi1.planning.measure_pipeline` (pipeline stages) and `phi1.training.measure_memory` (whole Trainer steps) both
take a baseline with `resident_bytes()`, reset the kernel's high-water mark with `reset_peak()`, run, and read
`peak_resident_bytes()`. Their processes start with `MALLOC_ENV` so that every tensor over 64 KiB is its own mmap,
returned to the kernel when freed, and the resident set follows the live tensors. It lives in `planning`, which
`training` may import and `planning` must not leave, so both harnesses share it.

psutil reports the current resident set but not the kernel's resettable peak (VmHWM after writing 5 to
/proc/self/clear_refs), so this reads /proc directly.
"""

from __future__ import annotations

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""Environment for measured processes (read by glibc at start-up): allocations over 64 KiB are their own mmap."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def resident_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def peak_resident_bytes() -> int:
    """This process's largest resident set since start or the last `reset_peak` (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset the peak to the current resident set (Linux: 5 written to /proc/self/clear_refs); False where the
    kernel does not allow it (then the peak counts from the process's start)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


__all__ = ["MALLOC_ENV", "peak_resident_bytes", "reset_peak", "resident_bytes"]
