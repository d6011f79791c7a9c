"""What the service tells its operators: Prometheus metrics, a request id on every answer and log line.

Metrics (served at ``/metrics`` beside BentoML's own, all labelled with the ``model_version`` and
``index_checksum`` that were serving):

- ``skumatch_request_duration_seconds{route, status}``: latency by route;
- ``skumatch_inference_batch_images``: images per inference call of the model;
- ``skumatch_top1_score``: the best score of each matched image;
- ``skumatch_match_answers_total{confident}``: matched images, ``confident="false"`` for a "no
  confident match" answer; the share is ``rate(..{confident="false"}) / rate(..)``;
- ``skumatch_rejections_total{route, reason}``: refused requests by reason (``reason`` as in the
  refusal's JSON, ``invalid_request`` for BentoML's own validation errors);
- ``skumatch_reloads_total{outcome}``: hot-swap checks (``swapped``, ``unchanged``, ``failed``).

The metric objects are made on first use: BentoML points ``prometheus_client`` at its
multiprocess folder only after the service module is imported.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from serving.refusals import REASON_HEADER

REQUEST_ID_HEADER = "x-request-id"
# A caller's own request id is kept when it is this tame (it is echoed into logs and headers).
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_request_id: ContextVar[str] = ContextVar("skumatch_request_id", default="")
LOGGER = logging.getLogger(__name__)
SCORE_BUCKETS = tuple(round(-0.2 + 0.05 * step, 2) for step in range(25))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Probes and scrapes: frequent, and not what the latency series is about.
UNCOUNTED = frozenset({"/metrics", "/livez", "/readyz", "/healthz"})


def current_request_id() -> str:
    """The id of the request being handled in this context ('' outside one)."""
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Prefix log records made while a request is handled with its id."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id and not getattr(record, "request_id", None):
            record.request_id = request_id
            record.msg = f"[request {request_id}] {record.msg}"
        return True


class ServiceMetrics:
    """The service's Prometheus series, made lazily, labelled with the model that serves."""

    def __init__(self) -> None:
        self._made: dict[str, Any] | None = None
        self.model_version, self.index_checksum = "none", "none"

    def set_model(self, model_version: str, index_checksum: str) -> None:
        """Label what follows with this model version and index checksum."""
        self.model_version, self.index_checksum = str(model_version), str(index_checksum)

    def _series(self) -> dict[str, Any]:
        if self._made is None:
            from prometheus_client import Counter, Histogram

            model = ["model_version", "index_checksum"]
            self._made = {
                "latency": Histogram(
                    "skumatch_request_duration_seconds", "Request latency by route", ["route", "status", *model]
                ),
                "batch": Histogram(
                    "skumatch_inference_batch_images",
                    "Images per inference call of the model",
                    model,
                    buckets=BATCH_BUCKETS,
                ),
                "top1": Histogram(
                    "skumatch_top1_score", "Best catalogue score of each matched image", model, buckets=SCORE_BUCKETS
                ),
                "answers": Counter(
                    "skumatch_match_answers",
                    "Matched images, by whether the best SKU was confident",
                    ["confident", *model],
                ),
                "rejections": Counter("skumatch_rejections", "Refused requests by reason", ["route", "reason", *model]),
                "reloads": Counter("skumatch_reloads", "Hot-swap checks by outcome", ["outcome", *model]),
            }
        return self._made

    def _model(self) -> dict[str, str]:
        return {"model_version": self.model_version, "index_checksum": self.index_checksum}

    def request(self, route: str, status: int, seconds: float) -> None:
        self._series()["latency"].labels(route=route, status=str(status), **self._model()).observe(seconds)

    def rejection(self, route: str, reason: str) -> None:
        self._series()["rejections"].labels(route=route, reason=reason, **self._model()).inc()

    def batch(self, images: int, model_version: str, index_checksum: str) -> None:
        labels = {"model_version": model_version, "index_checksum": index_checksum}
        self._series()["batch"].labels(**labels).observe(images)

    def answers(self, top_scores: list[float], confident: list[bool], model_version: str, index_checksum: str) -> None:
        labels = {"model_version": model_version, "index_checksum": index_checksum}
        series = self._series()
        for score, sure in zip(top_scores, confident):
            series["top1"].labels(**labels).observe(score)
            series["answers"].labels(confident=str(sure).lower(), **labels).inc()

    def reload(self, outcome: str) -> None:
        self._series()["reloads"].labels(outcome=outcome, **self._model()).inc()


METRICS = ServiceMetrics()


class RequestContext:
    """ASGI middleware: a request id for every request, its latency and refusal metrics, one log line.

    The id is the caller's ``X-Request-ID`` when it is short and tame, else a new one; it is
    sent back in ``X-Request-ID`` and prefixes the service's log lines for the request.

    Args:
        app: the wrapped ASGI application.
        routes: the paths counted under their own name; others count as ``other``, so that
            arbitrary paths cannot blow up the number of series.
        metrics: where to record (the process's :data:`METRICS` by default).
    """

    def __init__(self, app, routes: frozenset[str], metrics: ServiceMetrics = METRICS) -> None:
        self.app, self.routes, self.metrics = app, routes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = _request_id.set(request_id)
        path = scope.get("path", "")
        route = path if path in self.routes else "other"
        started, outcome = time.perf_counter(), {"status": 500, "reason": None}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                headers = list(message.get("headers", []))
                for name, value in headers:
                    if name.decode().lower() == REASON_HEADER:
                        outcome["reason"] = value.decode()
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            status, seconds = outcome["status"], time.perf_counter() - started
            if path not in UNCOUNTED:
                self.metrics.request(route, status, seconds)
                if 400 <= status < 500:
                    self.metrics.rejection(route, outcome["reason"] or "invalid_request")
                LOGGER.info(
                    "%s %s -> %d in %.1f ms (model %s)",
                    scope.get("method"),
                    path[:200],
                    status,
                    seconds * 1000,
                    self.metrics.model_version,
                )
            _request_id.reset(token)
