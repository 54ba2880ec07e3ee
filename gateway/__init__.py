"""The Upbit-compatible gateway: existing Upbit clients share the broker's one connection by
changing a URL (issue 14).

From the outside it is Upbit: ``ws://HOST:PORT/websocket/v1`` speaks Upbit's public WebSocket
protocol per client connection, and ``http://HOST:PORT/v1/...`` answers Upbit's quotation REST
paths. On the inside every client connection is a lease, and every frame comes from the
broker's Redis channels: the gateway never connects to Upbit's WebSocket itself.

Modules, one concept each (the protocol's rules themselves are the protocol core's
``broker.upbit.session``, which the simulator plays too; which gap events to believe, the
leader's only, is ``broker.event_gate``, the consumer library's rule):

* ``config``      GatewaySettings, every option (flags and ``UPBIT_GATEWAY_*`` variables)
* ``frames``      a broker frame as one client wants it: format, depth, SNAPSHOT (pure)
* ``hub``         the one pub/sub connection, channels counted, bursts fanned out per variant
* ``leases``      every client's lease, written and renewed in batches
* ``snapshots``   the broker's snapshot command, the fallback for a stream's first frame
* ``connection``  one client: its session, channels, lease and writes (slow ones cut, 1008)
* ``server``      Gateway: lifecycle, the websockets server, gaps, UP and idle clocks
* ``http``, ``rest``, ``forward``   the REST side (``gateway.http.process_request``)

Usage (``from gateway.server import Gateway``; ``from gateway.config import GatewaySettings``)::

    async with Gateway(GatewaySettings(redis_url=..., port=0)) as gw:
        async with websockets.asyncio.client.connect(gw.url) as ws: ...
"""
