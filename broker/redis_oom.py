"""Redis at maxmemory, on the wire: recognise its refusals, read its memory figures, and run the
few tiny writes that must go on anyway (I/O adapter; the episode rules are
:mod:`broker.core.oom`).

Redis 7 lets a Lua script declare ``#!lua flags=allow-oom``: it then runs, and may call any
command, even while Redis refuses ``denyoom`` commands for memory (checked on 7.0.15, through
EVAL and through redis-py's ``register_script``, whose EVALSHA falls back to SCRIPT LOAD, which
works at maxmemory too). A script without a shebang keeps the old rule: its first ``denyoom``
command fails unless the script already wrote something (so ``lease.lua``, which DELs before it
HSETs, still runs). The broker uses the flag only where the write is tiny and bounded, never
for data (docs/design.md, "Redis at maxmemory"): the leader lock (one short string per
namespace: without it a standby cannot take over and nobody leads) and the status hash (a fixed
set of fields overwritten in place: without it ``check`` blames a stale leader instead of the
memory). Redis 5 and 6 (and fakeredis) do not know script flags and fail to compile the shebang;
:class:`AllowOomScript` then runs the same script without it, as before.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from broker.core.oom import MemoryInfo

#: the Redis 7 shebang that lets a script run at maxmemory
ALLOW_OOM_SHEBANG = "#!lua flags=allow-oom\n"
#: what Redis says when it refuses a write for memory (after the ``OOM`` error code)
OOM_MESSAGE = "command not allowed when used memory > 'maxmemory'"


def is_oom(error: object) -> bool:
    """True for Redis refusing a write for memory: redis-py's ``OutOfMemoryError`` (also inside
    a failed MULTI), or a raw ``-OOM ...`` error reply (hiredis's ``ReplyError``)."""
    if isinstance(error, OutOfMemoryError):
        return True
    text = str(error)
    return text.startswith("OOM ") or OOM_MESSAGE in text


def _knows_no_script_flags(exc: ResponseError) -> bool:
    """Redis < 7 (and fakeredis) compile the shebang as Lua: ``unexpected symbol near '#'``."""
    return "near '#'" in str(exc)


class AllowOomScript:
    """A Lua script that also runs while Redis is at maxmemory (Redis >= 7), called like
    redis-py's ``Script``: ``await script(keys=[...], args=[...])``.

    Only for writes that are tiny and bounded: the flag lets them grow memory past the limit.
    ``whole``: send the script's text every time (EVAL, one round trip, never NOSCRIPT) instead
    of EVALSHA; for a short script on a path where a first call's extra round trips matter.
    """

    def __init__(self, redis: aioredis.Redis, body: str, *, whole: bool = False) -> None:
        self._redis = redis
        self._texts = (ALLOW_OOM_SHEBANG + body, body)
        self._flagged = redis.register_script(self._texts[0])
        self._plain = redis.register_script(body)
        self._whole = whole
        #: False once the server refused the shebang (Redis < 7): the plain script from then on
        self.flags_supported = True

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        if self.flags_supported:
            try:
                return await self._run(0, keys, args)
            except ResponseError as exc:
                if not _knows_no_script_flags(exc):
                    raise
                self.flags_supported = False
        return await self._run(1, keys, args)

    async def _run(self, which: int, keys: list[Any], args: list[Any]) -> Any:
        if self._whole:
            return await self._redis.eval(self._texts[which], len(keys), *keys, *args)
        script = self._plain if which else self._flagged
        return await script(keys=keys, args=args)


async def read_memory(redis: aioredis.Redis) -> MemoryInfo | None:
    """``INFO memory``, or None when this client may not run INFO (an ACL without ``+info``)
    or the server has no such section (fakeredis).

    Raises:
        redis.exceptions.RedisError: Redis could not be reached.
    """
    try:
        info: dict[str, Any] = await redis.info("memory")
    except ResponseError:
        return None
    return MemoryInfo.parse(info)


__all__ = ["ALLOW_OOM_SHEBANG", "OOM_MESSAGE", "AllowOomScript", "is_oom", "read_memory"]
