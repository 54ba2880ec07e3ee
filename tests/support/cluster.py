"""The Redis Cluster fixture lives in the testing layer (``broker.testing.cluster``: benchmarks
and users' own tests start clusters too); the tests' name for it."""

from broker.testing.cluster import *  # noqa: F403
from broker.testing.cluster import ClusterSetup, running_cluster

__all__ = ["ClusterSetup", "running_cluster"]
