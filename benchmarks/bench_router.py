"""Cost per frame of routing (``route_frame``) against a full decode (``decode_message``).

Run ``python -m benchmarks.bench_router`` (or ``--quick``). Frames are the official examples,
re-encoded compactly as Upbit sends them (type key first), in DEFAULT and SIMPLE spelling; the
orderbook has 30 units. Each cell is the best of several timed runs (the least disturbed by
other processes), in nanoseconds per frame. ``seed router`` is the router this project started
with (one Struct with both spellings and the control keys), kept here as the baseline.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from broker.upbit.fields import to_simple
from broker.upbit.messages import decode_message
from broker.upbit.router import FrameKind, Route, route_frame

_EXAMPLES = {
    "ticker": "ticker.default.json",
    "trade": "trade.default.json",
    "orderbook(30)": "orderbook.default.json",
    "candle.1s": "candle.1s.default.json",
}


def examples_dir() -> Path:
    """The in-repository copies of the Upbit examples, or ``$UPBIT_EXAMPLES_DIR``."""
    env = os.environ.get("UPBIT_EXAMPLES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "tests" / "data" / "upbit_examples"


def frames() -> list[tuple[str, str, bytes]]:
    """(name, format, compact bytes) for every benchmarked frame."""
    out = []
    for name, filename in _EXAMPLES.items():
        obj: dict[str, Any] = msgspec.json.decode((examples_dir() / filename).read_bytes())
        out.append((name, "DEFAULT", msgspec.json.encode(obj)))
        out.append((name, "SIMPLE", msgspec.json.encode(to_simple(obj["type"], obj))))
    return out


class _SeedHead(msgspec.Struct):
    type: str | None = None
    ty: str | None = None
    code: str | None = None
    cd: str | None = None
    stream_type: str | None = None
    st: str | None = None
    level: float | None = None
    lv: float | None = None
    status: str | None = None
    error: msgspec.Raw | None = None
    method: str | None = None
    mthd: str | None = None


_seed_decoder = msgspec.json.Decoder(_SeedHead)


def _seed_route(frame: bytes) -> Route:
    """The seed commit's route_frame (62af363), verbatim on the data path: the baseline."""
    try:
        head = _seed_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Route(FrameKind.MALFORMED, "", "", "", 0.0)
    type_ = head.type or head.ty
    code = head.code or head.cd
    if type_ is not None and code is not None:
        lv = head.level if head.level is not None else head.lv
        return Route(FrameKind.DATA, type_, code, head.stream_type or head.st or "", lv or 0.0)
    return Route(FrameKind.MALFORMED, "", "", "", 0.0)


def time_ns(fn: Callable[[bytes], object], frame: bytes, number: int) -> float:
    """Mean time of one ``fn(frame)`` over ``number`` calls, in ns."""
    start = time.perf_counter_ns()
    for _ in range(number):
        fn(frame)
    return (time.perf_counter_ns() - start) / number


def best_ns(
    fns: list[Callable[[bytes], object]], frame: bytes, number: int, repeat: int
) -> list[float]:
    """Best of ``repeat`` runs for each of ``fns``, the runs interleaved (noise hits all)."""
    for fn in fns:
        time_ns(fn, frame, min(number, 1000))  # warm up
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], time_ns(fn, frame, number))
    return best


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args(argv)
    number, repeat = (500, 3) if args.quick else (10_000, 15)

    header = (
        f"{'frame':<14} {'format':<8} {'bytes':>6} {'route_frame':>12} "
        f"{'seed router':>11} {'decode_message':>15} {'decode/route':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, fmt, frame in frames():
        route, seed, full = best_ns(
            [route_frame, _seed_route, decode_message], frame, number, repeat
        )
        print(
            f"{name:<14} {fmt:<8} {len(frame):>6} {route:>12.0f} {seed:>11.0f} "
            f"{full:>15.0f} {full / route:>12.1f}x"
        )
    print(f"\nns per frame, best of {repeat} runs of {number} calls each")


if __name__ == "__main__":
    main()
