"""Prometheus metrics of one server (its own registry, so two servers in one process never mix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("crossrec_requests", "Answered recommendation requests, per region, endpoint and "
                                "status", ["region", "endpoint", "status"], registry=r)
        self.latency = Histogram("crossrec_request_seconds", "Time from a request's arrival to its answer, per "
                                 "region", ["region"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("crossrec_batch_size", "Queries per forward pass of the micro-batcher",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.errors = Counter("crossrec_errors", "Error responses, per status code and reason",
                              ["status", "reason"], registry=r)
        self.queue_depth = Gauge("crossrec_queue_depth", "Queries waiting for the batcher", registry=r)
        self.swaps = Counter("crossrec_adapter_swaps", "Live adapter installs, per region and result",
                             ["region", "result"], registry=r)
