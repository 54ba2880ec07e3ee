"""Options of the Upbit simulator (simulator layer): one frozen object, passed down explicitly.

Every limit and timer the simulator enforces lives here, so tests can shrink the slow ones
(``up_interval``, ``idle_timeout``) and benchmarks can raise ``rate``. Defaults follow Upbit's
documented values (PROTOCOL.md sections 6 and 7).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulator listens, what market it plays and which limits it enforces.

    Attributes:
        host, port: where to listen; port 0 picks a free port (see ``Simulator.url``).
        rate: market events per second across the whole universe. An event is one change to
            one code: a trade (which pushes ``trade``, ``ticker`` and ``orderbook`` frames) or
            a book change (an ``orderbook`` frame). Each event yields one frame per connection
            subscribed to the (type, code) it touches; candles add at most one frame per
            second per (unit, code). Events go to codes with Zipf-like weights.
        markets: extra synthetic KRW codes (``KRW-SIM0001`` ...) after the real ones.
        seed: makes the market repeatable; ``None`` draws one (shown in the state).
        trade_share: fraction of events that are trades (the rest are book changes).
        tick: seconds between bursts of generated events.
        idle_timeout: drop (no close frame) a connection that neither sent nor received a
            frame for this long.
        up_interval: period of ``{"status":"UP"}`` after a text ``PING``.
        message_rate: (per second, per minute) messages a connection may send.
        connect_rate: WebSocket upgrades per second per client IP.
        error_close_delay: seconds between an error frame and the close (code 1000).
        exponent_numbers: spell big and tiny floats like Java (``1.16539E8``, ``5.0E-4``).
        record_sends: keep (time_ns, frame key) of every frame sent (``Simulator.sends``).
        compression: offer permessage-deflate (used only when the client asks for it).
        max_outbox: frames queued for one connection before it is dropped as too slow.
        close_timeout: seconds to wait for the client's close frame after ours.
        max_request_bytes: the largest client message accepted; a larger one closes the
            connection with 1009 (Upbit's own limit is UNCONFIRMED; websockets' default).
        refuse_codes: fault injection: a subscribe request naming any of these codes is
            answered with an ``INVALID_PARAM`` error frame, then closed (real Upbit ignores
            unknown codes; this stands for whatever it may refuse).
        trade_log_size: trades kept per code for ``GET /v1/trades/ticks`` and
            ``/_sim/trades``: every trade the market made, sent to anyone or not, oldest
            evicted first (48 bytes a trade: 20,000 x 42 busy codes is ~40 MB at most).
        candle_history: closed candles kept per (code, unit) for ``GET /v1/candles/...``,
            besides the open one (a candle exists only for a period with trades, so a quiet
            code keeps few; ~0.4 kB a candle).
        rest_rate: REST requests a second per client IP and group (``market``, ``ticker``,
            ``orderbook``, ``trade``, ``candle``; Upbit: 10), sliding one-second window,
            HTTP 429 beyond; 0 turns the limit off.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    rate: float = 100.0
    markets: int = 0
    seed: int | None = None
    trade_share: float = 0.5
    tick: float = 0.01
    idle_timeout: float = 120.0
    up_interval: float = 10.0
    message_rate: tuple[int, int] = (5, 100)
    connect_rate: int = 5
    error_close_delay: float = 0.2
    exponent_numbers: bool = False
    record_sends: bool = False
    compression: bool = True
    max_outbox: int = 200_000
    close_timeout: float = 2.0
    max_request_bytes: int = 2**20
    refuse_codes: tuple[str, ...] = ()
    trade_log_size: int = 20_000
    candle_history: int = 1_000
    rest_rate: int = 10

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("rate must be >= 0")
        if self.markets < 0:
            raise ValueError("markets must be >= 0")
        if not 0.0 <= self.trade_share <= 1.0:
            raise ValueError("trade_share must be within [0, 1]")
        if self.tick <= 0 or self.idle_timeout <= 0 or self.up_interval <= 0:
            raise ValueError("tick, idle_timeout and up_interval must be > 0")
        per_second, per_minute = self.message_rate
        if per_second < 1 or per_minute < 1 or self.connect_rate < 1:
            raise ValueError("rate limits need at least one message or connection")
        if self.max_outbox < 1:
            raise ValueError("max_outbox must be >= 1")
        if self.max_request_bytes < 64:
            raise ValueError("max_request_bytes must be >= 64")
        if self.trade_log_size < 1 or self.candle_history < 1:
            raise ValueError("trade_log_size and candle_history must be >= 1")
        if self.rest_rate < 0:
            raise ValueError("rest_rate must be >= 0 (0: no limit)")

    @classmethod
    def build(cls, config: SimulatorConfig | None = None, **overrides: Any) -> SimulatorConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown names are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown simulator option(s): {', '.join(unknown)}")
        for name in ("message_rate", "refuse_codes"):
            if name in overrides:
                overrides[name] = tuple(overrides[name])
        return replace(config or cls(), **overrides)


__all__ = ["SimulatorConfig"]
