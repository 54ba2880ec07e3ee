"""Sampling profiles of the broker process during throughput windows (``--profile``).

austin (``austin-dist`` in the ``bench`` extra) is preferred: it reads the CPython of every
machine this project runs on, py-spy could not read this machine's pyenv build ("Failed to
find python version"). py-spy is the fallback. Both write collapsed stacks (``frame;frame;...
count`` per line); :func:`summarize` turns one into the top functions by own and by inclusive
samples, which is what a reader of a benchmark record wants first.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any


def find_profiler() -> tuple[str, str] | None:
    """(``"austin"`` or ``"py-spy"``, its path), or None when neither is installed."""
    bin_dir = Path(sys.executable).parent
    for name in ("austin", "py-spy"):
        path = shutil.which(name) or (str(bin_dir / name) if (bin_dir / name).exists() else None)
        if path:
            return name, path
    return None


def command(tool: str, path: str, pid: int, seconds: float, out: Path) -> list[str]:
    """The command line that samples ``pid`` for ``seconds`` into ``out`` (collapsed stacks)."""
    if tool == "austin":
        # -s: leave out idle samples, so counts estimate CPU time; -i: every 200 us
        exposure = str(max(1, round(seconds)))  # austin takes whole seconds
        return [path, "-s", "-i", "200", "-x", exposure, "-p", str(pid), "-o", str(out)]
    return [
        path,
        *("record", "-p", str(pid), "-d", str(max(1, int(seconds)))),
        *("-r", "500", "-f", "raw", "-o", str(out), "--nonblocking"),
    ]


def summarize(text: str, top: int = 25) -> str:
    """Top functions of a collapsed-stack profile, as shares of the total weight: own (the
    function on top of the stack), then inclusive (anywhere on it)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        # austin prefixes process and thread ("P123;T0:123;..."); py-spy the thread name.
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";") if not f.startswith(("P", "T"))]
        frames = [f for f in frames if f] or ["<unknown>"]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples\n"
    # austin weighs a stack by the microseconds it sampled, py-spy by its number of samples
    lines = [f"total weight {total}", "", "own:"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def profiler(out_dir: Path) -> Callable[[int, float], Any] | None:
    """A ``profile(pid, seconds)`` hook for the throughput runs, or None with no profiler:
    each call samples in the background and leaves ``profile-NN.txt`` (raw) and
    ``profile-NN.top.txt`` (:func:`summarize`) in ``out_dir``."""
    found = find_profiler()
    if found is None:
        return None
    tool, path = found
    counter = iter(range(1000))

    def start(pid: int, seconds: float) -> Any:
        raw = out_dir / f"profile-{next(counter):02d}.txt"

        async def go() -> None:
            proc = await asyncio.create_subprocess_exec(
                *command(tool, path, pid, seconds, raw),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()
            if raw.exists():
                header = f"{tool}, pid {pid}, {seconds:g} s\n"
                raw.with_suffix(".top.txt").write_text(header + summarize(raw.read_text()))

        return asyncio.ensure_future(go())

    return start
