"""The broker's rules, pure: no asyncio, no redis, no websockets, no clock of their own.

Each piece is a small class fed with method calls (and the time, ``now``) whose outputs the
caller drains, like websockets' sans-I/O protocols; the I/O modules of ``broker/`` (``service``,
``leader_phase``, ``upstream``, ``publisher``, ``leases``, ``leader``) read, feed them and write
what they return:

    leader.py           LeaderCore: the leader phase's rules (union grace, gaps, events, replies,
                        status, quiet streams); owns the controller and the pieces below
    control.py          SubscriptionController: what to send upstream, and when
    reconcile.py        LeaseReconciler: which leases to read when, and what they add up to
    snapshots.py        SnapshotDesk: snapshot commands, cache lookups and their waiters
    gaps.py             GapTracker: what a new connection announces; Loss, the typed reasons
    backfill.py         BackfillDesk: the gaps' back-fill jobs and follow-ups; TradeFill and
                        CandleFill: what to fetch over REST and append to the history
    history.py          the history's caps per type (parse_history_caps, history_cap)
    quiet.py            QuietStreams: streams upstream holds that publish nothing
    lease.py            what a lease is: parse_lease, encode_lease_fields, Lease, listings
    lease_feedback.py   LeaseFeedback: what each lease holder is told
    stats.py            the counters the I/O adapters bump and the status and metrics read
    oom.py              OomWatch: Redis at maxmemory, episodes of refused writes, INFO figures

Every rule here is table-tested on virtual time without sockets (``tests/test_leader_core.py``,
``tests/test_control.py``, ``tests/test_lease_feedback.py``, ``tests/test_backfill.py``);
``tests/test_layers.py`` checks that nothing here imports an I/O library.
"""
