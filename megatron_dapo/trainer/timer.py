"""Where a training step's time goes: named phases, summed, as timing/* metrics."""
from __future__ import annotations

import contextlib
import sys
import time


class StepTimer:
    def __init__(self, announce_after_s: float | None = None, prefix: str = ""):
        """announce_after_s: a phase that took at least this long gets a console line as it ends (None: never)."""
        self.times: dict[str, float] = {}
        self.announce_after_s, self.prefix = announce_after_s, prefix

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.times[name] = self.times.get(name, 0.0) + seconds
        if self.announce_after_s is not None and seconds >= self.announce_after_s:
            print(f"{self.prefix}{name} took {seconds:.0f} s", file=sys.stderr, flush=True)

    def split(self, name: str, part: str, seconds: float) -> None:
        """Report `seconds` of `name`'s time as `part` instead."""
        self.times[name] -= seconds
        self.times[part] = self.times.get(part, 0.0) + seconds

    def total(self) -> float:
        return sum(self.times.values())

    def metrics(self) -> dict[str, float]:
        return {**{f"timing/{k}": v for k, v in self.times.items()}, "timing/step": self.total()}
