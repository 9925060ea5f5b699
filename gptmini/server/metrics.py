"""The Prometheus metrics of one server: requests, tokens, latencies, queue depth, batch occupancy, version."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The gauges read the engines when scraped, through the callables they are given."""

    def __init__(self, queue_depth: Callable[[], int], occupancy: Callable[[], int], max_batch: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptmini_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gptmini_prompt_tokens", "prompt tokens read", registry=r)
        self.completion_tokens = Counter("gptmini_completion_tokens", "tokens generated", registry=r)
        self.latency = Histogram("gptmini_request_latency_seconds", "request latency, to the last token",
                                 ["endpoint"], registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("gptmini_time_to_first_token_seconds", "request start to its first token",
                              registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.itl = Histogram("gptmini_inter_token_latency_seconds", "time between two tokens of one request",
                             registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        Gauge("gptmini_queue_depth", "requests waiting for a batch slot", registry=r).set_function(queue_depth)
        Gauge("gptmini_batch_occupancy", "sequences in the running batch", registry=r).set_function(occupancy)
        Gauge("gptmini_batch_slots", "batch slots (--max-batch)", registry=r).set(max_batch)
        self.served = Gauge("gptmini_served_model_info", "1 for the model version answering new requests",
                            ["model", "version", "quantize"], registry=r)
        self.swaps = Counter("gptmini_model_swaps", "times a new model version took over", registry=r)
        self.load_failures = Counter("gptmini_model_load_failures", "model versions that failed to load",
                                     ["version"], registry=r)

