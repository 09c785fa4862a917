"""The `autonat_*` Prometheus series served at `/metrics` (prometheus-client; docs/WEB.md lists them).

Two sources, nothing else:
- counters and histograms fed by the engine's event bus (`observe`, called for every event): mappings
  added, renewed, lost and failed (by protocol and by the router's error code), external address
  changes, router reboots, discoveries with their duration, SIP registrations;
- values read at scrape time (`_StatusCollector`): mappings by protocol and state, the engine's state,
  every error code the router answered (`autonat_router_errors_total`: handled ones too, such as the 725
  of a router that only grants permanent leases, docs/QUIRKS.md U1, which no `nat-error` reports),
  the SIP service's counters (calls, auth failures, refusals), the caps hit by the control channel and
  this listener, and the process (RSS, CPU, descriptors: prometheus-client's ProcessCollector).

The error code of a failed mapping comes from the `nat-error` event: its `error_code` (and
`error_protocol`) when the engine provides them, else the code the error line names ("UPnP error 606",
"PCP result 2", "NAT-PMP result 3", "HTTP 500"), else `timeout` or `other`. A router picks its own UPnP
codes, so at most MAX_CODE_LABELS distinct codes get their own series; later ones count as `other`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.process_collector import ProcessCollector

from autonat.engine.events import Event, EventKind
from autonat.sip.admission import Refusal
from autonat.web.status import Sources

MAX_CODE_LABELS: Final = 32
MAPPING_STATES: Final = ("pending", "active", "failed", "disabled", "removing")  # engine/lifecycle.py State
ENGINE_STATES: Final = ("disabled", "starting", "discovering", "ready", "stopped")
# Router round trips take a millisecond on a LAN and up to the request deadline (2 s default) when lost.
REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A discovery is one burst: milliseconds when every protocol answers, +0.25 s grace when one is silent.
DISCOVERY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_CODE_PATTERNS: Final = (
    ("upnp", re.compile(r"UPnP error (\d{1,6})\b"), ""),
    ("pcp", re.compile(r"\bPCP result (\d{1,3})\b"), ""),
    ("natpmp", re.compile(r"\bNAT-PMP result (\d{1,5})\b"), ""),
    ("upnp", re.compile(r"\banswered HTTP (\d{3})\b"), "http-"),
)
# The web listener's own caps (autonat.web.server counts them under these names), and its token failures.
WEB_CAPS: Final = (
    "web-connections",
    "web-evictions",
    "web-idle-timeout",
    "web-request-size",
    "web-bad-requests",
    "web-event-streams",
    "web-slow-client",
)
WEB_AUTH: Final = "web-auth"
_TIMEOUT = re.compile(r"did not answer|no answer|within [\d.]+ s|timed out")

# The control channel's refusal reasons (daemon/control.py `_Refusals`) by the cap they hit.
_CONTROL_CAPS: Final = (
    ("bad or missing token", None),  # not a cap: counted as autonat_control_auth_failures_total
    ("refused", "control-connections"),
    ("evicted", "control-evictions"),
    ("timed out", "control-idle-timeout"),
    ("malformed", "control-bad-requests"),
    ("too long", "control-request-size"),
    ("not read", "control-slow-client"),
)


def error_code(event: Mapping[str, Any], selected: str | None) -> tuple[str, str]:
    """(protocol, code) of a failed mapping's `nat-error` event; `selected` is the engine's protocol."""
    text = str(event.get("last_error") or "")
    protocol = str(event.get("error_protocol") or event.get("protocol") or selected or "unknown")
    code = event.get("error_code")
    if isinstance(code, int) and not isinstance(code, bool):
        return protocol, str(code)
    for named, pattern, prefix in _CODE_PATTERNS:
        match = pattern.search(text)
        if match:
            return named, prefix + str(int(match[1]))
    return protocol, "timeout" if _TIMEOUT.search(text) else "other"


class Metrics:
    """The registry behind `/metrics`: feed it every event (`observe`), render it at each scrape."""

    def __init__(self, sources: Sources, web_counters: Mapping[str, int], streams: Callable[[], int]) -> None:
        self.sources = sources
        # No `*_created` gauge beside every counter in the text format (they double the series for nothing:
        # the process start time is autonat_process_start_time_seconds). prometheus-client's switch is
        # process-wide; the daemon is the only exporter in its process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self.events = Counter("autonat_events", "Events published on the engine's bus, by kind", ["event"],
                              registry=registry)  # fmt: skip
        self.added = Counter("autonat_mappings_added", "Mappings the router granted (first grant or a new port)",
                             ["protocol"], registry=registry)  # fmt: skip
        self.renewals = Counter("autonat_mapping_renewals", "Mapping renewals the router granted", ["protocol"],
                                registry=registry)  # fmt: skip
        self.losses = Counter("autonat_mapping_losses", "Mappings the router dropped (found by verification)",
                              ["protocol"], registry=registry)  # fmt: skip
        self.failures = Counter("autonat_mapping_failures",
                                "Mapping requests that failed, by protocol and the router's error code",
                                ["protocol", "code"], registry=registry)  # fmt: skip
        self.address_changes = Counter("autonat_external_address_changes", "Changes of the router's external address",
                                       registry=registry)  # fmt: skip
        self.reboots = Counter("autonat_router_reboots", "Router reboots (state lost) seen from its epoch",
                               registry=registry)  # fmt: skip
        self.discoveries = Counter("autonat_discoveries", "Completed router discoveries, by selected protocol",
                                   ["protocol"], registry=registry)  # fmt: skip
        self.discovery_seconds = Histogram("autonat_discovery_duration_seconds",
                                           "Duration of a discovery burst (every protocol probed at once)",
                                           buckets=DISCOVERY_BUCKETS, registry=registry)  # fmt: skip
        self.request_seconds = Histogram("autonat_router_request_duration_seconds",
                                         "Round trips to the router, by protocol and operation",
                                         ["protocol", "operation"], buckets=REQUEST_BUCKETS,
                                         registry=registry)  # fmt: skip
        self.registrations = Counter("autonat_sip_registrations", "Successful SIP REGISTERs, by profile", ["profile"],
                                     registry=registry)  # fmt: skip
        self._codes: set[tuple[str, str]] = set()
        registry.register(_StatusCollector(sources, web_counters, streams))
        ProcessCollector(namespace="autonat", registry=registry)

    def observe(self, event: Event) -> None:
        """Count one event of the bus."""
        kind, data = event.kind, event.data
        self.events.labels(str(kind)).inc()
        protocol = str(data.get("protocol") or "unknown")
        if kind is EventKind.NAT_ADD:
            self.added.labels(protocol).inc()
            self._request_time(protocol, "map", data)
        elif kind is EventKind.NAT_RENEW:
            self.renewals.labels(protocol).inc()
            self._request_time(protocol, "renew", data)
        elif kind is EventKind.NAT_LOST:
            self.losses.labels(protocol).inc()
        elif kind is EventKind.NAT_ERROR:
            probe = self.sources.engine.probe
            failed_protocol, code = error_code(data, None if probe is None else probe.selected)
            if (failed_protocol, code) not in self._codes:
                if len(self._codes) >= MAX_CODE_LABELS:
                    code = "other"
                self._codes.add((failed_protocol, code))
            self.failures.labels(failed_protocol, code).inc()
            self._request_time(failed_protocol, "map", data)
        elif kind is EventKind.EXTERNAL_ADDRESS_CHANGE:
            self.address_changes.inc()
        elif kind is EventKind.ROUTER_REBOOT:
            self.reboots.inc()
        elif kind is EventKind.DISCOVERED:
            self.discoveries.labels(protocol).inc()
            self._discovery()
        elif kind is EventKind.SIP_REGISTER:
            self.registrations.labels(str(data.get("profile") or "unknown")).inc()

    def _request_time(self, protocol: str, operation: str, data: Mapping[str, Any]) -> None:
        """A request's round trip, when the event carries it (`elapsed`, seconds)."""
        elapsed = data.get("elapsed")
        if isinstance(elapsed, int | float) and not isinstance(elapsed, bool) and 0 <= elapsed < 3600:
            self.request_seconds.labels(protocol, operation).observe(elapsed)

    def _discovery(self) -> None:
        """The probe that discovery just installed: its whole burst, and each protocol's answer time."""
        probe = self.sources.engine.probe
        if probe is None:
            return
        self.discovery_seconds.observe(probe.elapsed_ms / 1000)
        for name, status in probe.protocols.items():
            if status.available and status.elapsed_ms is not None:
                self.request_seconds.labels(name, "probe").observe(status.elapsed_ms / 1000)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition (OpenMetrics when the scraper asks for it) and its content type."""
        if "application/openmetrics-text" in accept:
            return generate_openmetrics(self.registry), OPENMETRICS_CONTENT_TYPE  # type: ignore[no-untyped-call]
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _router_errors(counts: Mapping[tuple[str, int], int]) -> Metric:
    """Every code the router answered, by protocol and code; the first MAX_CODE_LABELS (in code order)
    get their own series, the rest count as `other` of their protocol."""
    family = CounterMetricFamily("autonat_router_errors",
                                 "Error codes the router answered (handled or final), by protocol and code",
                                 labels=["protocol", "code"])  # fmt: skip
    series: dict[tuple[str, str], int] = {}
    for index, ((protocol, code), count) in enumerate(sorted(counts.items())):
        label = str(code) if index < MAX_CODE_LABELS else "other"
        series[(protocol, label)] = series.get((protocol, label), 0) + count
    for (protocol, label), count in sorted(series.items()):
        family.add_metric([protocol, label], count)
    return family


class _StatusCollector:
    """The series read at scrape time from the engine's and the SIP service's status."""

    def __init__(self, sources: Sources, web_counters: Mapping[str, int], streams: Callable[[], int]) -> None:
        self.sources = sources
        self.web_counters = web_counters
        self.streams = streams

    def describe(self) -> Iterable[Metric]:
        return []  # names are not checked at registration: collect() reads a running daemon

    def collect(self) -> Iterator[Metric]:
        sip = self.sources.sip
        statuses = {} if sip is None else {name: sip.status(name) for name in sorted(sip.transports)}
        yield from self._engine()
        yield from self._sip(statuses)
        yield from self._caps(statuses)
        streams = GaugeMetricFamily("autonat_web_event_streams", "Open event streams of the status page")
        streams.add_metric([], self.streams())
        yield streams

    def _engine(self) -> Iterator[Metric]:
        status = self.sources.engine.status_object()
        selected = status.protocol or "none"
        counts = {(selected, state): 0 for state in MAPPING_STATES}  # zeros too, so rate() and alerts work
        for mapping in status.mappings:
            key = (mapping.protocol or selected, str(mapping.state))
            counts[key] = counts.get(key, 0) + 1
        mappings = GaugeMetricFamily("autonat_mappings", "Mappings by protocol and state", labels=["protocol", "state"])
        for (protocol, state), count in sorted(counts.items()):
            mappings.add_metric([protocol, state], count)
        yield mappings
        engine = GaugeMetricFamily("autonat_nat_state", "The engine's state (1 for the current one)", labels=["state"])
        for name in ENGINE_STATES:
            engine.add_metric([name], 1 if status.state == name else 0)
        yield engine
        known = GaugeMetricFamily("autonat_external_address_known", "1 when the router's external address is known")
        known.add_metric([], 0 if status.external_ip is None else 1)
        yield known
        double = GaugeMetricFamily("autonat_double_nat", "1 when there is a NAT beyond the router")
        double.add_metric([], 1 if status.double_nat else 0)
        yield double
        yield _router_errors(self.sources.engine.router_errors())

    def _sip(self, statuses: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        sip = self.sources.sip
        if sip is None:
            return
        calls = CounterMetricFamily("autonat_calls", "Calls since start, by profile and direction",
                                    labels=["profile", "direction"])  # fmt: skip
        failed = CounterMetricFamily("autonat_calls_failed", "Incoming calls that failed, by profile",
                                     labels=["profile"])  # fmt: skip
        messages = CounterMetricFamily("autonat_sip_messages", "SIP messages, by profile and direction",
                                       labels=["profile", "direction"])  # fmt: skip
        malformed = CounterMetricFamily("autonat_sip_malformed_messages", "Malformed SIP input dropped, by profile",
                                        labels=["profile"])  # fmt: skip
        for name, status in statuses.items():
            calls.add_metric([name, "in"], status.get("CALLS-IN", 0))
            calls.add_metric([name, "out"], status.get("CALLS-OUT", 0))
            failed.add_metric([name], status.get("FAILED-CALLS-IN", 0))
            counts = status.get("SIP-Messages", {})
            messages.add_metric([name, "received"], counts.get("received", 0))
            messages.add_metric([name, "sent"], counts.get("sent", 0))
            malformed.add_metric([name], counts.get("malformed", 0))
        yield from (calls, failed, messages, malformed)
        active = GaugeMetricFamily("autonat_calls_active", "Calls in progress")
        active.add_metric([], sip.active_calls)
        yield active
        registrations = GaugeMetricFamily("autonat_registrations", "Registered SIP contacts (live bindings)")
        registrations.add_metric([], len(sip.registrations()))
        yield registrations
        # The guard is shared by every profile: any profile's status carries the same figures.
        auth = next(iter(statuses.values()), {}).get("Auth", {})
        for name, key, text in (
            ("autonat_sip_auth_failures", "failures", "Failed SIP digest authentications"),
            ("autonat_sip_auth_bans", "bans", "Sources banned after repeated authentication failures"),
            ("autonat_sip_banned_requests", "dropped_banned", "Requests from banned sources, dropped unanswered"),
        ):
            family = CounterMetricFamily(name, text)
            family.add_metric([], auth.get(key, 0))
            yield family

    def _caps(self, statuses: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        caps = dict.fromkeys((*WEB_CAPS, *(cap for _, cap in _CONTROL_CAPS if cap is not None)), 0)
        sip = self.sources.sip
        if sip is not None:
            caps.update({f"sip-{refusal}": 0 for refusal in Refusal})
            # The admission caps are shared by every profile too.
            for refusal, count in next(iter(statuses.values()), {}).get("Refused-Calls", {}).items():
                caps[f"sip-{refusal}"] = int(count)
            caps["sip-connections"] = sum(t.stats.refused_connections for t in sip.transports.values())
        control_auth = 0
        for reason, count in self.sources.control_refusals().items():
            cap = next((cap for words, cap in _CONTROL_CAPS if words in reason), "control-other")
            if cap is None:
                control_auth += count
            else:
                caps[cap] = caps.get(cap, 0) + count
        for reason, count in self.web_counters.items():
            if reason != WEB_AUTH:
                caps[reason] = caps.get(reason, 0) + count
        family = CounterMetricFamily("autonat_caps_hit", "Requests and connections refused by a cap, by cap",
                                     labels=["cap"])  # fmt: skip
        for cap, count in sorted(caps.items()):
            family.add_metric([cap], count)
        yield family
        control = CounterMetricFamily("autonat_control_auth_failures", "Control connections without the right token")
        control.add_metric([], control_auth)
        yield control
        web = CounterMetricFamily("autonat_web_auth_failures", "Status page requests without the right token")
        web.add_metric([], self.web_counters.get(WEB_AUTH, 0))
        yield web
