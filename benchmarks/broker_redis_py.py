"""``upbit-broker`` with the publisher forced onto redis-py pipelines (benchmark comparisons).

``python -m benchmarks.broker_redis_py run`` behaves like ``upbit-broker run`` except that
:class:`broker.publisher.Publisher` is built with ``raw_resp=False``: the road the broker takes
for clients raw RESP cannot speak for, and the one every burst took before ``broker/resp.py``.
"""

from __future__ import annotations

from typing import Any

import broker.publisher

_init = broker.publisher.Publisher.__init__


def _redis_py_init(self: Any, *args: Any, **kwargs: Any) -> None:
    kwargs["raw_resp"] = False
    _init(self, *args, **kwargs)


broker.publisher.Publisher.__init__ = _redis_py_init  # type: ignore[method-assign]

if __name__ == "__main__":
    from cli.main import main

    main()
