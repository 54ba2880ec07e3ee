"""Real third-party Upbit clients through the gateway, unpatched (issue 14, "Verified with the
clients people use").

    python3 -m venv /tmp/clients-venv
    /tmp/clients-venv/bin/pip install ccxt==4.5.90 pyupbit==0.2.34 cryptofeed==2.4.1
    .venv/bin/python scripts/verify_clients.py /tmp/clients-venv

Starts, as subprocesses: a ``redis-server`` on a free port, the simulator (as Upbit, WebSocket
and REST), a broker, and two gateways sharing that broker (``ws://``, and ``wss://`` with a
throwaway CA and certificate). Then runs each client in the throwaway venv, as a subprocess,
until every call it makes has answered and for at least ``--seconds``:

========== ===================================================================================
client     calls, and what it needed (nothing of the library is edited or monkeypatched)
========== ===================================================================================
ccxt       ``load_markets``, ``fetch_ticker`` (BTC/KRW, and ADA/KRW nobody streams),
           ``watch_ticker`` BTC/KRW, ``watch_trades`` ETH/KRW, ``watch_order_book`` XRP/KRW
           on ``ccxt.pro.upbit``. Needed: ``exchange.urls['api'] = {'public': HTTP, 'private':
           HTTP, 'ws': WS}`` (its documented URL override; ``private`` too, so nothing can reach
           Upbit: the gateway refuses private paths).
pyupbit    ``get_tickers(fiat="KRW")`` (and ``is_details=True``, which sends ``isDetails``),
           ``get_current_price`` (one code and a list), ``WebSocketManager("ticker", [...])``
           (its own process, ``isOnlyRealtime``). pyupbit 0.2.34 has NO URL
           setting: every URL is a literal ``https://api.upbit.com/...`` /
           ``wss://api.upbit.com/websocket/v1`` inside its functions. Needed: environment only:
           ``HTTPS_PROXY`` naming a CONNECT proxy (this script runs one, it tunnels
           ``api.upbit.com:443`` to the TLS gateway and refuses anything else), honoured by
           requests and by websockets >= 15; ``REQUESTS_CA_BUNDLE`` and ``SSL_CERT_FILE`` naming
           the throwaway CA, whose certificate the gateway serves for ``api.upbit.com``.
cryptofeed ``FeedHandler`` with its ``Upbit`` feed, TRADES and L2_BOOK on two symbols, over
           ``wss://`` (it refuses ``ws://``). Needed: its endpoints pointed at the gateway, in a
           subclass (``websocket_endpoints = [WebsocketEndpoint(WSS)]``, ``rest_endpoints =
           [RestEndpoint(HTTPS, routes=Routes('/v1/market/all'))]``: the addresses, as
           cryptofeed's own exchanges declare them; it has no address setting in its config);
           ``SSL_CERT_FILE`` and ``REQUESTS_CA_BUNDLE`` naming the CA; ``{'uvloop': False}`` in
           its config (with uvloop, ``FeedHandler.run()`` needs a current loop; see
           shared/notes/cryptofeed.md).
========== ===================================================================================

Checks: each call got what it asked (markets as the simulator lists them, tickers with
prices, trades, books with bids below asks and best first, REST answers; a realtime-only
stream never a SNAPSHOT, cryptofeed never a trade twice), and the simulator saw ONE upstream
connection (opened once) holding exactly the union of what the clients asked, which is also
the union of the namespace's leases. ``--drop`` also cuts that connection once every client is
served: the broker reconnects (the one other connection allowed) and every client's streams
must go on without the client reconnecting. Prints a table (``--json``: the same as JSON);
exits 0 when every check passed, 1 when one failed, 2 when the venv is missing or lacks a
client. The logs of every process stay in the work directory it prints.

Not run by CI: the clients are not the project's dependencies. The same file runs each client
(``VENV/bin/python scripts/verify_clients.py --client NAME CONFIG``), so its top level imports
only the standard library; the orchestrator imports the project when it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the versions this was verified with (what pip resolved from the local mirror)
PINNED = {"ccxt": "4.5.90", "pyupbit": "0.2.34", "cryptofeed": "2.4.1"}
DEFAULT_VENV = "/tmp/clients-venv"
NAMESPACE = "t"  # the namespace of brokers started by broker.testing
#: the only CONNECT target the proxy tunnels (pyupbit's hard-coded host)
UPBIT_HOST = "api.upbit.com:443"
#: every client has answered every call within this long, or its checks fail
READY_WITHIN = 60.0
#: this file, as the clients run it
THIS_FILE = str(Path(__file__).resolve())

# What each client asks. Chosen so that the sets differ and overlap: the union has streams
# only one client wants and streams several share.
CCXT_ASKS: dict[str, Any] = {
    "rest_tickers": ["BTC/KRW", "ADA/KRW"],
    "ticker": "BTC/KRW",
    "trades": "ETH/KRW",
    "orderbook": "XRP/KRW",
}
PYUPBIT_ASKS: dict[str, Any] = {
    "fiat": "KRW",
    "price": "KRW-BTC",
    "prices": ["KRW-BTC", "KRW-LINK"],
    "ws_type": "ticker",
    "ws_codes": ["KRW-XRP", "KRW-DOGE"],
}
CRYPTOFEED_ASKS: dict[str, Any] = {"symbols": ["BTC-KRW", "SOL-KRW"]}


def expected_union() -> dict[str, set[str]]:
    """The upstream set the clients' asks add up to (REST polls lease their tickers too)."""

    def code(symbol: str, sep: str) -> str:  # BTC/KRW, BTC-KRW -> KRW-BTC
        base, quote = symbol.split(sep)
        return f"{quote}-{base}"

    cf = {code(s, "-") for s in CRYPTOFEED_ASKS["symbols"]}
    return {
        "ticker": {code(CCXT_ASKS["ticker"], "/")}
        | {code(s, "/") for s in CCXT_ASKS["rest_tickers"]}
        | {PYUPBIT_ASKS["price"], *PYUPBIT_ASKS["prices"], *PYUPBIT_ASKS["ws_codes"]},
        "trade": {code(CCXT_ASKS["trades"], "/")} | cf,
        "orderbook": {code(CCXT_ASKS["orderbook"], "/")} | cf,
    }


# =============================================================================================
# The clients (run by the throwaway venv's interpreter: standard library and the client only)
# =============================================================================================


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the orchestrator."""
    sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def wait_for_stop() -> None:
    """Block until the orchestrator says stop (a line, or EOF: it went away)."""
    sys.stdin.readline()


def stop_thread(cfg: Mapping[str, Any]) -> threading.Event:
    """An event set when the orchestrator says stop, or after ``cfg["max_seconds"]`` (it
    never said: it is gone). Daemon threads: nothing waits for a read of stdin in progress."""
    stop = threading.Event()

    def watch() -> None:
        wait_for_stop()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    timer = threading.Timer(cfg["max_seconds"], stop.set)
    timer.daemon = True
    timer.start()
    return stop


def book_faults(bids: Sequence[Sequence[float]], asks: Sequence[Sequence[float]]) -> list[str]:
    """What is wrong with one side-by-side book (best first on each side)."""
    faults = []
    if not bids or not asks:
        faults.append(f"empty side: {len(bids)} bids, {len(asks)} asks")
        return faults
    if bids[0][0] >= asks[0][0]:
        faults.append(f"crossed: bid {bids[0][0]} >= ask {asks[0][0]}")
    if [b[0] for b in bids] != sorted((b[0] for b in bids), reverse=True):
        faults.append("bids not best first")
    if [a[0] for a in asks] != sorted(a[0] for a in asks):
        faults.append("asks not best first")
    if any(s[1] < 0 for s in (*bids, *asks)):
        faults.append("negative size")
    return faults


def client_ccxt(cfg: dict[str, Any]) -> None:
    import ccxt.pro as ccxtpro  # the throwaway venv's

    asks = cfg["asks"]
    started = time.monotonic()
    out: dict[str, Any] = {}

    async def run() -> None:
        exchange = ccxtpro.upbit({"enableRateLimit": True})
        # ccxt's URL override: configuration, the library is untouched
        exchange.urls["api"] = {"public": cfg["http"], "private": cfg["http"], "ws": cfg["ws"]}
        tasks: set[asyncio.Task[None]] = set()
        try:
            markets = await exchange.load_markets()
            out["load_markets"] = {"ids": sorted(m["id"] for m in markets.values())}
            for symbol in asks["rest_tickers"]:
                t = await exchange.fetch_ticker(symbol)
                out[f"fetch_ticker {symbol}"] = {
                    "symbol": t["symbol"],
                    "last": t["last"],
                    "timestamp": t["timestamp"],
                }
            seen: dict[str, dict[str, Any]] = {}

            async def ticker() -> None:
                rec = seen.setdefault("watch_ticker", {"updates": 0, "symbols": set()})
                while True:
                    t = await exchange.watch_ticker(asks["ticker"])
                    rec["updates"] += 1
                    rec["symbols"].add(t["symbol"])
                    rec["last"] = t["last"]
                    rec.setdefault("first_s", time.monotonic() - started)
                    rec["last_at"] = time.time()

            async def trades() -> None:
                rec = seen.setdefault(
                    "watch_trades",
                    {"ids": set(), "bad": [], "symbols": set(), "updates": 0, "repeated": 0},
                )
                while True:
                    batch = await exchange.watch_trades(asks["trades"])
                    rec["updates"] += 1
                    for tr in batch:
                        rec["repeated"] += tr["id"] in rec["ids"]
                        rec["ids"].add(tr["id"])
                        rec["symbols"].add(tr["symbol"])
                        if not (
                            tr["price"] > 0 and tr["amount"] > 0 and tr["side"] in ("buy", "sell")
                        ):
                            rec["bad"].append([tr["price"], tr["amount"], tr["side"]])
                        rec["last"] = tr["price"]
                    rec.setdefault("first_s", time.monotonic() - started)
                    rec["last_at"] = time.time()

            async def book() -> None:
                rec = seen.setdefault(
                    "watch_order_book", {"updates": 0, "faults": [], "symbols": set()}
                )
                while True:
                    ob = await exchange.watch_order_book(asks["orderbook"])
                    rec["updates"] += 1
                    rec["symbols"].add(ob["symbol"])
                    bids, asks_ = ob["bids"], ob["asks"]
                    rec["faults"] += book_faults(bids, asks_)[:1]
                    rec["depth"] = [len(bids), len(asks_)]
                    rec["best"] = [bids[0][0] if bids else None, asks_[0][0] if asks_ else None]
                    rec.setdefault("first_s", time.monotonic() - started)
                    rec["last_at"] = time.time()

            # one after the other, as a bot adds streams: each watch re-sends the whole set
            for watch in (ticker, trades, book):
                tasks.add(asyncio.create_task(watch()))
                await asyncio.sleep(0)
            stop = stop_thread(cfg)
            ready = False
            while not stop.is_set():
                if any(t.done() for t in tasks):
                    break  # a watch raised: report it
                if not ready and len(seen) == 3 and all(r.get("updates") for r in seen.values()):
                    ready = True
                    emit("ready", after_s=round(time.monotonic() - started, 3))
                await asyncio.wait(tasks, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    out["error"] = repr(t.exception())
            for name, rec in seen.items():
                out[name] = {k: sorted(v) if isinstance(v, set) else v for k, v in rec.items()}
                if "ids" in rec:
                    out[name]["trades"] = len(rec["ids"])
                    del out[name]["ids"]
            out["ws_connections"] = len(exchange.clients)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await exchange.close()

    try:
        asyncio.run(run())
    except Exception as exc:  # reported, then judged by the orchestrator
        out["error"] = repr(exc)
    emit("result", calls=out)


def client_pyupbit(cfg: dict[str, Any]) -> None:
    # Every URL pyupbit uses is a literal inside its functions: the environment (HTTPS_PROXY,
    # REQUESTS_CA_BUNDLE, SSL_CERT_FILE) set by the orchestrator is all it needed.
    import pyupbit  # the throwaway venv's

    asks = cfg["asks"]
    started = time.monotonic()
    out: dict[str, Any] = {}
    try:
        tickers = pyupbit.get_tickers(fiat=asks["fiat"])
        out["get_tickers"] = {"codes": tickers}
        detailed = pyupbit.get_tickers(fiat=asks["fiat"], is_details=True)  # sends isDetails
        out["get_tickers details"] = {
            "items": len(detailed),
            "with_event": sum("market_event" in x for x in detailed),
        }
        price = pyupbit.get_current_price(asks["price"])
        out[f"get_current_price {asks['price']}"] = {"price": price}
        prices = pyupbit.get_current_price(asks["prices"])
        out[f"get_current_price {','.join(asks['prices'])}"] = {"prices": prices}
    except Exception as exc:
        out["error"] = repr(exc)
        emit("result", calls=out)
        return
    emit("partial", calls=out)  # what it got, should the WebSocket never answer

    rec: dict[str, Any] = {"frames": 0, "by_code": {}, "types": set(), "stream_types": set()}
    rec["bad"] = []
    manager = pyupbit.WebSocketManager(asks["ws_type"], asks["ws_codes"])
    lock = threading.Lock()
    ready = threading.Event()

    def record(frame: Any) -> None:
        with lock:
            rec["frames"] += 1
            if not isinstance(frame, dict):
                rec["bad"].append(str(frame)[:80])  # e.g. 'ConnectionClosedError'
                return
            rec["types"].add(frame.get("type"))
            rec["stream_types"].add(frame.get("stream_type"))
            code = frame.get("code")
            per = rec["by_code"].setdefault(code, {"frames": 0})
            per["frames"] += 1
            per["last"] = frame.get("trade_price")
            per["last_at"] = time.time()
            if not (isinstance(per["last"], int | float) and per["last"] > 0):
                rec["bad"].append(f"{code}: trade_price {per['last']!r}")
            rec.setdefault("first_s", time.monotonic() - started)
            rec["last_at"] = time.time()
            if not ready.is_set() and set(asks["ws_codes"]) <= set(rec["by_code"]):
                ready.set()
                emit("ready", after_s=round(time.monotonic() - started, 3))

    def read() -> None:
        while True:
            record(manager.get())

    # The first get() starts the manager's process (a fork), so it comes before any thread of
    # ours reads stdin: the forked child closes its stdin, and would wait forever for the lock
    # of a readline() in progress.
    record(manager.get())
    threading.Thread(target=read, daemon=True).start()
    stop_thread(cfg).wait()
    manager.terminate()
    with lock:
        out["WebSocketManager"] = {
            k: sorted(map(str, v)) if isinstance(v, set) else v for k, v in rec.items()
        }
    emit("result", calls=out)
    # the reader thread is blocked in the manager's queue: leave without joining it
    os._exit(0)


def client_cryptofeed(cfg: dict[str, Any]) -> None:
    from cryptofeed import FeedHandler  # the throwaway venv's
    from cryptofeed.connection import RestEndpoint, Routes, WebsocketEndpoint
    from cryptofeed.defines import L2_BOOK, TRADES
    from cryptofeed.exchanges import Upbit
    from cryptofeed.symbols import Symbols

    class GatewayUpbit(Upbit):
        """cryptofeed's Upbit feed with the gateway's addresses: nothing else differs."""

        websocket_endpoints = [WebsocketEndpoint(cfg["wss"])]  # noqa: RUF012
        rest_endpoints = [RestEndpoint(cfg["https"], routes=Routes("/v1/market/all"))]  # noqa: RUF012

    symbols = cfg["asks"]["symbols"]
    started = time.monotonic()
    trades: dict[str, dict[str, Any]] = {}
    trade_ids: dict[str, set[str]] = {}
    books: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}

    async def on_trade(t: Any, receipt: float) -> None:
        rec = trades.setdefault(t.symbol, {"trades": 0, "bad": 0, "repeated": 0})
        seen = trade_ids.setdefault(t.symbol, set())
        rec["repeated"] += t.id in seen
        seen.add(t.id)
        rec["trades"] += 1
        rec["bad"] += not (t.price > 0 and t.amount > 0 and t.side in ("buy", "sell"))
        rec["last"] = float(t.price)
        rec.setdefault("first_s", time.monotonic() - started)
        rec["last_at"] = time.time()

    async def on_book(b: Any, receipt: float) -> None:
        rec = books.setdefault(b.symbol, {"updates": 0, "faults": []})
        rec["updates"] += 1
        bids = [(float(p), float(s)) for p, s in b.book.bids.to_list()]
        asks = [(float(p), float(s)) for p, s in b.book.asks.to_list()]
        rec["faults"] += book_faults(bids, asks)[:1]
        rec["depth"] = [len(bids), len(asks)]
        rec["best"] = [bids[0][0] if bids else None, asks[0][0] if asks else None]
        rec.setdefault("first_s", time.monotonic() - started)
        rec["last_at"] = time.time()

    try:
        handler = FeedHandler(
            config={"uvloop": False, "log": {"filename": cfg["log"], "level": "WARNING"}}
        )
        feed = GatewayUpbit(
            symbols=symbols,
            channels=[TRADES, L2_BOOK],
            callbacks={TRADES: on_trade, L2_BOOK: on_book},
        )
        out["symbols"] = {"count": len(Symbols.get(Upbit.id)[0])}
        handler.add_feed(feed)
    except Exception as exc:
        out["error"] = repr(exc)
        emit("result", calls=out)
        return
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = stop_thread(cfg)

    async def watch() -> None:
        ready = False
        while not stop.is_set():
            if not ready and all(s in trades and s in books for s in symbols):
                ready = True
                emit("ready", after_s=round(time.monotonic() - started, 3))
            await asyncio.sleep(0.1)
        loop.stop()  # FeedHandler.run() then shuts its feeds down and returns

    watcher = loop.create_task(watch())
    try:
        handler.run(install_signal_handlers=False)
    except Exception as exc:
        out["error"] = repr(exc)
    watcher.cancel()
    out["addresses"] = {"ws": feed.address, "rest": GatewayUpbit.rest_endpoints[0].address}
    out["trades"] = trades
    out["books"] = books
    emit("result", calls=out)
    os._exit(0)  # FeedHandler's executor threads are not ours to join


CLIENTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "ccxt": client_ccxt,
    "pyupbit": client_pyupbit,
    "cryptofeed": client_cryptofeed,
}


# =============================================================================================
# The orchestrator (the project's interpreter)
# =============================================================================================


class VenvMissing(Exception):
    """The throwaway venv is not there, or lacks a client."""


def how_to_create(venv: str) -> str:
    pins = " ".join(f"{name}=={version}" for name, version in PINNED.items())
    return (
        f"create it with:\n  python3 -m venv {venv}\n  {venv}/bin/pip install {pins}\n"
        "(never in the project's .venv: the clients are not its dependencies)"
    )


def client_versions(venv: str) -> dict[str, str]:
    """The clients' versions in ``venv``.

    Raises:
        VenvMissing: no interpreter there, or a client is not installed.
    """
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise VenvMissing(f"no venv at {venv}\n{how_to_create(venv)}")
    code = (
        "import importlib.metadata as m, json\n"
        "v = {}\n"
        f"for p in {list(PINNED)!r}:\n"
        "    try: v[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: v[p] = None\n"
        "print(json.dumps(v))"
    )
    proc = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise VenvMissing(f"{python} failed: {proc.stderr.strip()[-500:]}\n{how_to_create(venv)}")
    versions: dict[str, str | None] = json.loads(proc.stdout)
    missing = [p for p, v in versions.items() if v is None]
    if missing:
        raise VenvMissing(f"{venv} lacks {', '.join(missing)}\n{how_to_create(venv)}")
    return {p: str(v) for p, v in versions.items()}


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1, localhost and
    api.upbit.com (pyupbit reaches the gateway under Upbit's name); ``(ca, cert, key)``."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        proc = subprocess.run(
            ["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=30,
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")

    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=upbit-broker verify_clients CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")  # fmt: skip
    (directory / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,DNS:api.upbit.com,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2",
            "-extfile", "ext.cnf")  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


@dataclass
class ConnectProxy:
    """An ``HTTPS_PROXY`` for clients that hard-code ``api.upbit.com``: a CONNECT to
    ``api.upbit.com:443`` is tunnelled to the TLS gateway; any other target is refused (403), so
    nothing leaves this machine."""

    gateway_port: int
    port: int = 0
    tunnels: int = 0
    refused: list[str] = field(default_factory=list)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ConnectProxy]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for w in list(self._writers):  # open tunnels: the server's close leaves them
                w.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if method != "CONNECT" or target != UPBIT_HOST:
                self.refused.append(f"{method} {target}")
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            async with asyncio.timeout(10):
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.gateway_port)
            self._writers.add(upstream)
            self.tunnels += 1
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            pass  # a client gone mid-way: its own library reports what it saw
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()


@dataclass
class ClientRun:
    """One client subprocess: what it said, line by line."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ready_after: float | None = None
    result: dict[str, Any] | None = None
    #: the result is the whole one (not a "partial" said before a call that may hang)
    final: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a library printing on stdout
                if event.get("event") == "ready":
                    self.ready_after = event.get("after_s")
                    self.ready.set()
                elif event.get("event") in ("partial", "result"):
                    self.result = event.get("calls", {})
                    self.final = event["event"] == "result"
        finally:
            self.done.set()

    async def stop(self, within: float) -> None:
        """Ask it to stop and report; killed if it has not exited within ``within`` s."""
        if self.proc.stdin is not None and self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"stop\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
        try:
            async with asyncio.timeout(within):
                await self.done.wait()
                await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 6) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])


def client_log(path: Path) -> Any:
    """The open file a client's stderr goes to (a plain function: open() is a blocking call)."""
    return open(path, "ab")


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without proxies or ``UPBIT_*`` (nothing may steer the clients but what
    we set), plus ``extra``."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in proxies and not k.startswith("UPBIT_")
        and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    }  # fmt: skip
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Row:
    client: str
    call: str
    ok: bool
    figures: str


def judge_ccxt(res: dict[str, Any], markets: list[str]) -> list[Row]:
    rows = []
    lm = res.get("load_markets")
    ids = lm["ids"] if lm else []
    rows.append(
        Row("ccxt", "load_markets", sorted(ids) == sorted(markets) and bool(ids),
            f"{len(ids)} markets (the simulator lists {len(markets)})")
    )  # fmt: skip
    for symbol in CCXT_ASKS["rest_tickers"]:
        t = res.get(f"fetch_ticker {symbol}")
        ok = bool(t) and t["symbol"] == symbol and (t["last"] or 0) > 0 and bool(t["timestamp"])
        rows.append(
            Row("ccxt", f"fetch_ticker {symbol}", ok, f"last {t['last']:,}" if t else "no answer")
        )
    w = res.get("watch_ticker")
    ok = bool(w) and w["updates"] > 0 and w["symbols"] == [CCXT_ASKS["ticker"]] and w["last"] > 0
    rows.append(
        Row("ccxt", f"watch_ticker {CCXT_ASKS['ticker']}", ok,
            f"{w['updates']} updates, last {w['last']:,}, first after {w['first_s']:.2f} s"
            if w else "nothing")
    )  # fmt: skip
    w = res.get("watch_trades")
    ok = bool(w) and w["trades"] > 0 and not w["bad"] and w["symbols"] == [CCXT_ASKS["trades"]]
    rows.append(
        Row("ccxt", f"watch_trades {CCXT_ASKS['trades']}", ok,
            f"{w['trades']} trades, last {w['last']:,}, bad {len(w['bad'])}, "
            f"repeated {w['repeated']}" if w else "nothing")
    )  # fmt: skip
    w = res.get("watch_order_book")
    ok = (
        bool(w)
        and w["updates"] > 0
        and not w["faults"]
        and w["symbols"] == [CCXT_ASKS["orderbook"]]
    )
    rows.append(
        Row("ccxt", f"watch_order_book {CCXT_ASKS['orderbook']}", ok,
            f"{w['updates']} books, {w['depth'][0]} bids x {w['depth'][1]} asks, best "
            f"{w['best'][0]:,} / {w['best'][1]:,}" + (f"; {w['faults'][0]}" if w["faults"] else "")
            if w else "nothing")
    )  # fmt: skip
    n = res.get("ws_connections")
    rows.append(Row("ccxt", "one WebSocket for its watches", n == 1, f"{n} connection(s)"))
    return rows


def judge_pyupbit(res: dict[str, Any], markets: list[str]) -> list[Row]:
    rows = []
    fiat = PYUPBIT_ASKS["fiat"]
    want = [m for m in markets if m.startswith(fiat)]
    got = (res.get("get_tickers") or {}).get("codes", [])
    rows.append(
        Row("pyupbit", f'get_tickers(fiat="{fiat}")', sorted(got) == sorted(want) and bool(got),
            f"{len(got)} codes (the simulator lists {len(want)})")
    )  # fmt: skip
    d = res.get("get_tickers details")
    rows.append(
        Row("pyupbit", f'get_tickers(fiat="{fiat}", is_details=True)',
            bool(d) and d["items"] == len(want) and d["with_event"] == d["items"],
            f"{d['items']} markets, {d['with_event']} with market_event" if d else "no answer")
    )  # fmt: skip
    one = res.get(f"get_current_price {PYUPBIT_ASKS['price']}")
    price = one["price"] if one else None
    rows.append(
        Row("pyupbit", f"get_current_price {PYUPBIT_ASKS['price']}",
            isinstance(price, int | float) and price > 0, f"{price:,}" if price else "no answer")
    )  # fmt: skip
    many = res.get(f"get_current_price {','.join(PYUPBIT_ASKS['prices'])}")
    prices = many["prices"] if many else {}
    ok = isinstance(prices, dict) and sorted(prices) == sorted(PYUPBIT_ASKS["prices"])
    ok = ok and all(isinstance(p, int | float) and p > 0 for p in prices.values())
    rows.append(
        Row("pyupbit", f"get_current_price [{', '.join(PYUPBIT_ASKS['prices'])}]", ok,
            ", ".join(f"{c} {p:,}" for c, p in prices.items()) if prices else "no answer")
    )  # fmt: skip
    w = res.get("WebSocketManager")
    codes = PYUPBIT_ASKS["ws_codes"]
    label = f'WebSocketManager("{PYUPBIT_ASKS["ws_type"]}", {codes})'
    if not w:
        rows.append(Row("pyupbit", label, False, "nothing"))
        return rows
    ok = (
        sorted(w["by_code"]) == sorted(codes)
        and w["types"] == [PYUPBIT_ASKS["ws_type"]]
        and w["stream_types"] == ["REALTIME"]  # it asks isOnlyRealtime
        and not w["bad"]
    )
    per = ", ".join(f"{c} {v['frames']} (last {v['last']:,})" for c, v in w["by_code"].items())
    rows.append(
        Row("pyupbit", label, ok,
            f"{w['frames']} frames: {per}; {'/'.join(w['stream_types'])}"
            + (f"; bad: {w['bad'][:2]}" if w["bad"] else ""))
    )  # fmt: skip
    return rows


def judge_cryptofeed(res: dict[str, Any], markets: list[str]) -> list[Row]:
    rows = []
    n = (res.get("symbols") or {}).get("count")
    rows.append(
        Row("cryptofeed", "symbols (REST /v1/market/all)", n == len(markets),
            f"{n} symbols (the simulator lists {len(markets)})")
    )  # fmt: skip
    addr = (res.get("addresses") or {}).get("ws", "")
    for symbol in CRYPTOFEED_ASKS["symbols"]:
        t = (res.get("trades") or {}).get(symbol)
        # it asks isOnlyRealtime: no SNAPSHOT, so never a trade twice
        ok = bool(t) and t["trades"] > 0 and t["bad"] == 0 and t["repeated"] == 0
        ok = ok and str(addr).startswith("wss://")
        rows.append(
            Row("cryptofeed", f"TRADES {symbol} (wss)", ok,
                f"{t['trades']} trades, last {t['last']:,}, bad {t['bad']}, "
                f"repeated {t['repeated']}" if t else "nothing")
        )  # fmt: skip
        b = (res.get("books") or {}).get(symbol)
        ok = bool(b) and b["updates"] > 0 and not b["faults"]
        rows.append(
            Row("cryptofeed", f"L2_BOOK {symbol} (wss)", ok,
                f"{b['updates']} books, {b['depth'][0]} bids x {b['depth'][1]} asks, best "
                f"{b['best'][0]:,} / {b['best'][1]:,}" + (f"; {b['faults'][0]}" if b["faults"]
                else "") if b else "nothing")
        )  # fmt: skip
    return rows


JUDGES = {"ccxt": judge_ccxt, "pyupbit": judge_pyupbit, "cryptofeed": judge_cryptofeed}


def last_frames(name: str, res: dict[str, Any]) -> dict[str, float | None]:
    """When each stream of a client's last frame arrived (wall clock)."""
    if name == "ccxt":
        watches = ("watch_ticker", "watch_trades", "watch_order_book")
        return {k: (res.get(k) or {}).get("last_at") for k in watches}
    if name == "pyupbit":
        by_code = (res.get("WebSocketManager") or {}).get("by_code", {})
        return {c: (by_code.get(c) or {}).get("last_at") for c in PYUPBIT_ASKS["ws_codes"]}
    out: dict[str, float | None] = {}
    for kind in ("trades", "books"):
        for symbol in CRYPTOFEED_ASKS["symbols"]:
            out[f"{kind} {symbol}"] = ((res.get(kind) or {}).get(symbol) or {}).get("last_at")
    return out


def judge_reconnect(name: str, res: dict[str, Any], since: float) -> Row:
    """Its streams went on after the broker's upstream connection was cut and came back
    (the client itself was never closed: ``on_gap = "snapshot"``)."""
    last = last_frames(name, res)
    late = [k for k, t in last.items() if t is None or t <= since]
    return Row(
        name, "streams go on after an upstream reconnect", bool(res) and not late,
        f"{len(last) - len(late)}/{len(last)} streams received frames after it"
        + (f"; none on {', '.join(late)}" if late else ""),
    )  # fmt: skip


def as_sets(by_type: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    return {t: set(codes) for t, codes in by_type.items() if codes}


def show(held: Mapping[str, set[str]]) -> str:
    return "; ".join(f"{t} {','.join(sorted(c))}" for t, c in sorted(held.items()))


async def verify(
    venv: str, seconds: float, rate: float, directory: Path, *, drop: bool = False
) -> tuple[list[Row], dict[str, Any]]:
    """Run everything; the rows of the table and the run's facts."""
    # The project is imported here, not at the top: the clients run this file too.
    import redis.asyncio as aioredis

    from broker.leases import LeaseStore
    from broker.testing import (
        ManagedProcess,
        RedisServer,
        broker_process,
        read_status,
        simulator_process,
        wait_for,
    )
    from broker.testing.processes import CLI, clean_env, spawn
    from broker.upbit.types import union

    facts: dict[str, Any] = {"workdir": str(directory)}
    rows: list[Row] = []
    ca, cert, key = make_certificates(directory / "tls")

    @asynccontextmanager
    async def gateway(redis_url: str, sim_http: str, name: str, *flags: str) -> AsyncIterator[str]:
        """``upbit-broker gateway`` as a process; yields its WebSocket URL once serving."""
        log = directory / f"gateway-{name}.log"
        env = clean_env(UPBIT_BROKER_REDIS_URL=redis_url, UPBIT_BROKER_NAMESPACE=NAMESPACE)
        args = [*CLI, "gateway", "--port", "0", "--gateway-id", name]
        args += ["--upstream-rest-url", sim_http, *flags]  # Upbit's REST is the simulator's
        proc = ManagedProcess(spawn(args, log, env), f"gateway {name}", log)

        def serving() -> str:
            if not proc.alive:
                raise RuntimeError(f"gateway {name} exited: {proc.output()[-2000:]}")
            for line in proc.output().splitlines():
                if line.startswith("serving "):
                    return line.split()[1]
            return ""

        try:
            yield await wait_for(serving, 30, message=f"gateway {name} serving")
        finally:
            await proc.stop()

    async with AsyncExitStack() as stack:
        redis_server = await stack.enter_async_context(RedisServer())
        sim = await stack.enter_async_context(simulator_process(directory, rate=rate, seed=14))
        await stack.enter_async_context(
            broker_process(redis_server.url, sim.url, "verify", directory)
        )
        redis = aioredis.Redis.from_url(redis_server.url)
        stack.push_async_callback(redis.aclose)

        async def leading() -> bool:
            return bool((await read_status(redis, NAMESPACE)).get("leader"))

        await wait_for(leading, 30, message="the broker leading")
        ws_url = await stack.enter_async_context(gateway(redis_server.url, sim.http_url, "gw-ws"))
        wss_url = await stack.enter_async_context(
            gateway(redis_server.url, sim.http_url, "gw-wss", "--tls-cert", str(cert),
                    "--tls-key", str(key))
        )  # fmt: skip
        http_url = ws_url.replace("ws://", "http://").removesuffix("/websocket/v1")
        https_url = wss_url.replace("wss://", "https://").removesuffix("/websocket/v1")
        tls_port = int(https_url.rsplit(":", 1)[1])
        proxy = await stack.enter_async_context(ConnectProxy(tls_port).running())
        markets = [m["market"] for m in await sim.get("/v1/market/all")]
        facts.update(
            simulator=sim.url, gateways=[ws_url, wss_url], proxy=f"http://127.0.0.1:{proxy.port}"
        )

        trust = {"SSL_CERT_FILE": str(ca), "REQUESTS_CA_BUNDLE": str(ca)}
        configs = {
            "ccxt": ({"http": http_url, "ws": ws_url, "asks": CCXT_ASKS}, {}),
            "pyupbit": (
                {"asks": PYUPBIT_ASKS},
                {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}", **trust},
            ),
            "cryptofeed": (
                {
                    "https": https_url,
                    "wss": wss_url,
                    "asks": CRYPTOFEED_ASKS,
                    "log": str(directory / "cryptofeed-feedhandler.log"),
                },
                trust,
            ),
        }
        # a client that never hears "stop" (this process died) stops itself after this long
        max_seconds = READY_WITHIN + 2 * seconds + 150
        for cfg, _ in configs.values():
            cfg["max_seconds"] = max_seconds
        python = str(Path(venv) / "bin" / "python")
        runs: dict[str, ClientRun] = {}
        readers: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        try:
            for name, (cfg, env) in configs.items():
                log = directory / f"client-{name}.log"
                with client_log(log) as err:
                    proc = await asyncio.create_subprocess_exec(
                        python, THIS_FILE, "--client", name, json.dumps(cfg),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        stderr=err, env=base_env(env), cwd=directory,
                    )  # fmt: skip
                runs[name] = ClientRun(name, proc, log)
                readers.add(asyncio.create_task(runs[name].read()))

            async def all_ready() -> bool:
                return all(r.ready.is_set() or r.done.is_set() for r in runs.values())

            with contextlib.suppress(TimeoutError):
                await wait_for(all_ready, READY_WITHIN, 0.1, message="every client answered")
            facts["ready_after_s"] = {n: r.ready_after for n, r in runs.items()}

            # While every client is connected: ONE upstream connection holding their union,
            # which is the union of the namespace's leases.
            store = LeaseStore(redis, NAMESPACE)
            want = expected_union()
            seen: dict[str, Any] = {}

            async def union_holds() -> bool:
                state = await sim.state()
                listing = await store.list_all()
                leased = as_sets(union(*(x.subscriptions for x in listing.leases)).by_type())
                conns = state["connections"]
                held = as_sets(conns[0]["subscriptions"]) if len(conns) == 1 else None
                seen.update(
                    connections=len(conns), held=held, leased=leased,
                    leases=[x.client_id for x in listing.leases],
                )  # fmt: skip
                return held == leased == want

            union_ok = True
            reconnected: float | None = None
            try:
                await wait_for(union_holds, 20, 0.1, message="the union upstream")
            except TimeoutError:
                union_ok = False
            facts["union"] = {k: v if not isinstance(v, dict) else show(v) for k, v in seen.items()}

            end = started + seconds
            if drop:
                # The broker's upstream connection cut, as a network failure would cut it: the
                # clients are not closed (on_gap "snapshot"), their streams must go on.
                opened = (await sim.state())["totals"]["connections_opened"]
                await sim.drop()

                async def back() -> bool:
                    state = await sim.state()
                    return state["totals"]["connections_opened"] > opened and await union_holds()

                with contextlib.suppress(TimeoutError):
                    await wait_for(back, 30, 0.1, message="the broker back upstream")
                    reconnected = time.time()
                end = max(end, time.monotonic() + max(3.0, seconds / 2))
            # the rest of the run: the clients keep receiving
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            # read before the clients go: once their leases are released, the broker opens a
            # fresh connection for the empty set
            state = await sim.state()
            await asyncio.gather(*(r.stop(30) for r in runs.values()))
        finally:
            for r in runs.values():
                if r.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        r.proc.kill()
                    await r.proc.wait()
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

        for name, r in runs.items():
            res = r.result or {}
            if not r.final or "error" in res:
                why = res.get("error") or f"exited {r.proc.returncode} without its whole result"
                rows.append(Row(name, "ran", False, f"{why} [{r.tail()}]"))
            rows.extend(JUDGES[name](res, markets))
            if drop:
                since = reconnected if reconnected is not None else time.time()
                rows.append(judge_reconnect(name, res, since))
        totals = state["totals"]
        conns = state["connections"]
        opened = 1 + drop  # the --drop cut is the one reconnect allowed
        rows.append(
            Row("simulator", "ONE upstream connection", len(conns) == 1
                and totals["connections_opened"] == opened
                and (not drop or reconnected is not None),
                f"{len(conns)} open, {totals['connections_opened']} opened in the run"
                + (" (one cut by --drop)" if drop else "")
                + f", {totals['frames_sent']:,} frames sent, {totals['requests']} requests")
        )  # fmt: skip
        rows.append(
            Row("simulator", "holds exactly the clients' union", union_ok,
                f"{show(seen['held'] or {})} = union of {len(seen['leases'])} leases"
                if union_ok else
                f"held {seen.get('held')}, leases' union {seen.get('leased')}, asked {want}")
        )  # fmt: skip
        rows.append(
            Row("proxy", f"only CONNECT {UPBIT_HOST}", not proxy.refused and proxy.tunnels > 0,
                f"{proxy.tunnels} tunnels to the TLS gateway, refused {proxy.refused or 'none'}")
        )  # fmt: skip
        facts["leases"] = seen.get("leases")
    return rows, facts


def print_table(rows: list[Row], versions: Mapping[str, str], facts: Mapping[str, Any]) -> None:
    print("versions: " + ", ".join(f"{p} {v}" for p, v in versions.items()))
    heads = ("client", "call", "result", "figures")
    widths = [
        max(len(heads[0]), *(len(r.client) for r in rows)),
        max(len(heads[1]), *(len(r.call) for r in rows)),
        6,
    ]
    line = f"{{:<{widths[0]}}}  {{:<{widths[1]}}}  {{:<{widths[2]}}}  {{}}"
    print(line.format(*heads))
    print(line.format(*("-" * w for w in widths), "-" * 7))
    for r in rows:
        print(line.format(r.client, r.call, "ok" if r.ok else "FAIL", r.figures))
    failed = sum(not r.ok for r in rows)
    ready = facts.get("ready_after_s", {})
    print(
        "every call answered after: "
        + ", ".join(f"{n} {v:.2f} s" if v is not None else f"{n} never" for n, v in ready.items())
    )
    print(f"logs: {facts['workdir']}")
    print(f"{len(rows) - failed} passed, {failed} failed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run ccxt, pyupbit and cryptofeed, unpatched, through the gateway\n"
        "(simulator + redis + broker + gateways started here) and check what each got.\n"
        "Exit 0: every check passed; 1: one failed; 2: the venv is missing or incomplete.",
        epilog=f"The venv holds the clients; {how_to_create('VENV')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "venv", nargs="?", default=DEFAULT_VENV,
        help=f"the throwaway venv with the clients (default: {DEFAULT_VENV})",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=float, default=8.0,
        help="how long the clients run at least (default: 8)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=300.0,
        help="simulator market events a second (default: 300)",
    )  # fmt: skip
    parser.add_argument(
        "--drop", action="store_true",
        help="also cut the broker's upstream connection once every client is served, and "
        "check that every client's streams go on (the clients stay connected)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workdir", help="where logs go (default: a new temporary directory)")
    parser.add_argument("--client", nargs=2, metavar=("NAME", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.client:  # this file, run by the throwaway venv as one client
        CLIENTS[args.client[0]](json.loads(args.client[1]))
        return 0

    try:
        versions = client_versions(args.venv)
    except VenvMissing as exc:
        print(f"verify_clients: {exc}", file=sys.stderr)
        return 2
    from broker.testing.processes import workdir

    directory = Path(args.workdir) if args.workdir else workdir("upbit-verify-clients-")
    directory.mkdir(parents=True, exist_ok=True)
    rows, facts = asyncio.run(verify(args.venv, args.seconds, args.rate, directory, drop=args.drop))
    if args.json:
        print(json.dumps({
            "versions": versions,
            "ok": all(r.ok for r in rows),
            "rows": [r.__dict__ for r in rows],
            "facts": facts,
        }, indent=2, default=str))  # fmt: skip
    else:
        print_table(rows, versions, facts)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
