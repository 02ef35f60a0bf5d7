"""Prometheus metrics of a server (one registry per server, so tests can run several in a process).

The engine thread calls the recording methods; `/metrics` renders the registry as Prometheus text.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("longcat_requests_running", "Requests holding a cache slot", registry=registry)
        self.waiting = Gauge("longcat_requests_waiting", "Requests queued for a slot", registry=registry)
        self.slots_used = Gauge("longcat_kv_slots_used", "KV-cache slots in use", registry=registry)
        self.slots_total = Gauge("longcat_kv_slots_total", "KV-cache slots (--max-batch)", registry=registry)
        self.generated = Counter("longcat_generation_tokens", "Output tokens generated", registry=registry)
        self.prompt = Counter("longcat_prompt_tokens", "Prompt tokens of requests that received a first token",
                              registry=registry)  # fmt: skip
        self.requests = Counter(
            "longcat_requests_finished", "Requests ended, by finish reason", ["finish_reason"], registry=registry
        )
        self.ttft = Histogram(
            "longcat_time_to_first_token_seconds", "From arrival to the first output token",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "longcat_time_per_output_token_seconds", "Mean time per output token after the first, per request",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.drafted = Counter("longcat_spec_draft_tokens", "MTP draft tokens proposed", registry=registry)
        self.accepted = Counter("longcat_spec_accepted_tokens", "MTP draft tokens accepted", registry=registry)
        self.acceptance = Gauge(
            "longcat_spec_acceptance_rate", "Accepted / proposed MTP drafts since the start", registry=registry
        )
        self._drafted = self._accepted = 0

    def update_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.slots_used.set(running)
        self.waiting.set(waiting)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, count: int) -> None:
        self.generated.inc(count)

    def speculation(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self._drafted += drafted
        self._accepted += accepted
        self.acceptance.set(self._accepted / self._drafted if self._drafted else 0.0)

    def finished(self, request, reason: str) -> None:  # noqa: ANN001 - engine.Request
        self.requests.labels(finish_reason=reason).inc()
        if request.first_token_at is not None:  # a request aborted in the queue prefilled nothing
            self.prompt.inc(len(request.prompt))
        if request.first_token_at is not None and len(request.output) > 1:
            self.tpot.observe((time.perf_counter() - request.first_token_at) / (len(request.output) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
