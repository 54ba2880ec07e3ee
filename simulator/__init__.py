"""A faithful local Upbit quotation WebSocket, for demos, offline development, tests and benchmarks.

Simulator layer: imports only the pure protocol core (``broker.upbit``, its errors included),
never the rest of ``broker`` (``tests/test_layers.py`` checks). Modules, one concept each:

* ``config``     SimulatorConfig, every option and limit
* ``universe``   which codes exist (real KRW/BTC/USDT pairs plus synthetic ones), ticks, weights
* ``book``       one code's order book in integer ticks and size units
* ``market``     per-code state, the seeded event generator, frame values
* ``tradelog``   every trade a code made (bounded), for REST trades and ``/_sim/trades``
* ``candles``    candle periods, 1 s to a year
* ``encode``     wire spelling: field order, DEFAULT/SIMPLE names, lists, Java-style numbers
* ``session``    one connection's protocol state (requests, overwrite, LIST, PING, budget)
* ``hub``        subscription index and fan-out of events into frames
* ``connection`` websockets I/O of one connection (reader, sender, idle watchdog, stall)
* ``rest``       Upbit's quotation REST API (trades, candles, tickers...) and its rate limit
* ``http``       operator endpoints (/_sim/...) and REST (/v1/...) on the same port
* ``sends``      the send log for latency measurement
* ``server``     Simulator: lifecycle and clocks

Usage::

    async with Simulator(port=0, rate=500, seed=1) as sim:
        async with websockets.asyncio.client.connect(sim.url) as ws: ...
"""

from simulator.config import SimulatorConfig
from simulator.sends import frame_key
from simulator.server import WS_PATH, Simulator

__all__ = ["WS_PATH", "Simulator", "SimulatorConfig", "frame_key"]
