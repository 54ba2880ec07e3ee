"""Micro-benchmark of the broker's hot path, in-process, no I/O (benchmark 7).

Per frame: the receive loop's work (``route_frame``, the routing-table lookup, the append to
the publisher's pending list) and the publisher's packing of that frame into a burst, raw RESP
(what the broker uses) against a redis-py pipeline (the fallback, and the code before this
benchmark existed). Frames are rendered by the simulator's own market and encoder (ticker,
trade and orderbook of 200 codes, DEFAULT format), so sizes and field orders are Upbit's.
Each cell is the best of several runs (the least disturbed by other processes), ns per frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from benchmarks import harness as h
from broker.keys import Keys
from broker.publisher import Publisher, Target, make_target
from broker.upbit.router import FrameKind, route_frame
from broker.upbit.types import Format, StreamKey


def sample_frames(n: int = 3000, codes_total: int = 200, seed: int = 7) -> list[bytes]:
    """Realtime frames as the simulator sends them to a connection holding every stream."""
    from simulator.encode import Encoder
    from simulator.hub import Hub
    from simulator.market import Market
    from simulator.session import Stream
    from simulator.universe import build_universe

    markets, codes = h.universe_codes(codes_total, seed)

    class Sink:
        format = Format.DEFAULT

        def __init__(self) -> None:
            self.frames: list[bytes] = []

        def push(self, frame: bytes) -> None:
            self.frames.append(frame)

    market = Market(
        list(build_universe(markets, seed)), seed=seed, trade_share=0.5, now_ms=1_700_000_000_000
    )
    hub = Hub(market, Encoder())
    sink = Sink()
    hub.attach(sink, [Stream(t, c) for t in h.LOAD_TYPES for c in codes])
    now_ms = 1_700_000_000_000
    while len(sink.frames) < n:
        now_ms += 10
        hub.publish(market.step(20, now_ms), 0.0)
    return sink.frames[:n]


def _best(fn: Callable[[], Any], per: int, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - start) / per)
    return best


def run(quick: bool) -> dict[str, Any]:
    frames = sample_frames(1000 if quick else 5000)
    repeat = 3 if quick else 9
    keys = Keys(h.NAMESPACE)
    table: dict[tuple[str, str, float], Target] = {}
    for frame in frames:
        r = route_frame(frame)
        table.setdefault((r.type, r.code, r.level), make_target(keys, StreamKey(r.type, r.code)))
    data = FrameKind.DATA

    def receive_loop() -> list[tuple[Target, bytes]]:
        # The body of Upstream._receive for a data frame (Publisher.enqueue is an append).
        pending: list[tuple[Target, bytes]] = []
        get = table.get
        for frame in frames:
            r = route_frame(frame)
            if r.kind is data:
                target = get((r.type, r.code, r.level))
                if target is not None:
                    pending.append((target, frame))
        return pending

    def route_only() -> None:
        for frame in frames:
            route_frame(frame)

    batch = receive_loop()
    client = aioredis.Redis()  # never connected: only its pipeline's packing is used
    publisher = Publisher(client)
    fallback = Publisher(client, raw_resp=False)
    conn = client.connection_pool.make_connection()

    def pack_resp(size: int) -> Callable[[], None]:
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]

        def go() -> None:
            for chunk in chunks:
                newest = dict(chunk)
                parts = [b"%b$%d\r\n%b\r\n" % (t.publish_prefix, len(f), f) for t, f in chunk]
                for key, fields in publisher._cache_mappings(newest).items():
                    parts.append(h_encode(b"HSET", key, *fields))
                b"".join(parts)

        return go

    def pack_redis_py(size: int) -> Callable[[], None]:
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]

        def go() -> None:
            for chunk in chunks:
                pipe = client.pipeline(transaction=False)
                command = pipe.execute_command
                newest = dict(chunk)
                for target, frame in chunk:
                    command("PUBLISH", target.channel, frame)
                for key, fields in fallback._cache_mappings(newest).items():
                    command("HSET", key, *fields)
                conn.pack_commands([args for args, _ in pipe.command_stack])

        return go

    from broker.resp import encode_command as h_encode

    n = len(frames)
    sizes = [10, 100, 1000]
    out: dict[str, Any] = {
        "frames": n,
        "mean_frame_bytes": round(sum(map(len, frames)) / n, 1),
        "route_frame_ns": round(_best(route_only, n, repeat), 1),
        "receive_loop_ns": round(_best(receive_loop, n, repeat), 1),
        "pack_resp_ns": {s: round(_best(pack_resp(s), n, repeat), 1) for s in sizes},
        "pack_redis_py_ns": {s: round(_best(pack_redis_py(s), n, repeat), 1) for s in sizes},
    }
    out["hot_path_ns"] = round(out["receive_loop_ns"] + out["pack_resp_ns"][100], 1)
    out["hot_path_redis_py_ns"] = round(out["receive_loop_ns"] + out["pack_redis_py_ns"][100], 1)
    return out
