"""Peak memory of a running process, sampled from /proc/PID/status (shared by the benchmarks).

RssAnon is memory the process owns (heap, tensors); VmHWM is the peak resident set including the
pages of memory-mapped files it touched, which are page cache the kernel may drop at any time.
"""

from __future__ import annotations

import threading
import time


def status_kb(pid: int, keys: tuple[str, ...] = ("RssAnon", "VmHWM")) -> dict[str, int]:
    """The given /proc/PID/status fields in kB (missing while the process starts or after it ends)."""
    out: dict[str, int] = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


class PeakSampler:
    """``with PeakSampler(pid, interval) as s: ...`` samples on a thread; ``s.peak[key]`` in kB."""

    def __init__(self, pid: int, interval: float, keys: tuple[str, ...] = ("RssAnon", "VmHWM")) -> None:
        self.pid, self.interval, self.keys = pid, interval, keys
        self.peak = dict.fromkeys(keys, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in status_kb(self.pid, self.keys).items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
