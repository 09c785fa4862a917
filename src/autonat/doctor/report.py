"""`autonat doctor`'s output: the text a person reads, `--json`, and `--share`'s Markdown for a bug report."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from autonat.doctor.findings import Finding, Measurements, Verdict, exit_status

MASK = "x.x.x.x"


def to_dict(m: Measurements, findings: list[Finding]) -> dict[str, Any]:
    data = asdict(m)
    data["external_kind"] = None if m.external_kind is None else str(m.external_kind)
    return {
        "status": exit_status(findings),
        "external_address": m.external_ip,
        "reachability": {t.protocol: t.reachable for t in m.trials},
        "findings": [f.to_dict() for f in findings],
        "measurements": data,
    }


def summary(m: Measurements, findings: list[Finding]) -> dict[str, Any]:
    """What the running daemon's status page shows of a doctor run (the control verb `doctor-report`): the
    verdicts and the text lines, without the raw measurements (kilobytes, not tens of them)."""
    return {
        "status": exit_status(findings),
        "external_address": m.external_ip,
        "reachability": {t.protocol: t.reachable for t in m.trials},
        "findings": [f.to_dict() for f in findings],
        "text": text(m, findings),
        "quick": m.quick,
    }


def text(m: Measurements, findings: list[Finding]) -> str:
    width = max((len(f.check) for f in findings), default=10)
    lines = []
    for finding in findings:
        quirk = f" [{finding.quirk}]" if finding.quirk else ""
        lines.append(f"{finding.verdict:<8}{finding.check:<{width + 2}}{finding.summary}{quirk}")
        if finding.fix and finding.verdict is not Verdict.OK:
            lines.append(f"{'':<8}{'':<{width + 2}}-> {finding.fix}")
    verdict = "autonat can work with this router" if exit_status(findings) == 0 else "something fails (see above)"
    lines.append(f"\n{verdict}; {m.elapsed:.1f} s{' (--quick)' if m.quick else ''}.")
    return "\n".join(lines)


def _address(address: str) -> re.Pattern[str]:
    """`address` as a whole (203.0.113.1 must not match inside 203.0.113.100)."""
    return re.compile(rf"(?<![\w.:]){re.escape(address)}(?![\w]|\.\d)")


def _redact(value: str, external: str | None) -> str:
    return _address(external).sub(MASK, value) if external else value


def _fenced(lines: Sequence[str]) -> str:
    """`lines` as a fenced code block whose fence no line can close (CommonMark §4.5: a longer run of
    backticks than any inside)."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n" + "".join(f"{line}\n" for line in lines) + f"{fence}\n"


def _trace_section(trace: Sequence[str], external: str | None) -> str:
    lines = [_redact(line, external) for line in trace]
    if not lines:
        return "\n## Wire trace\n\nNothing was traced.\n"
    return (
        f"\n## Wire trace\n\nThe run's exchanges, decoded ({len(lines)} records, oldest first; time since the first;"
        " digest responses and tokens redacted).\n\n" + _fenced(lines)
    )


def share(
    m: Measurements, findings: list[Finding], *, show_address: bool = False, trace: Sequence[str] | None = None
) -> str:
    """Markdown to paste into a bug report; the external address masked unless asked, no token or secret
    (doctor holds none; the wire trace, `trace`, comes redacted from autonat.aio.trace and is masked
    here like the rest), with the wire trace of the run as a fenced section at the end when given."""
    external = None if show_address else m.external_ip
    rows = "\n".join(
        f"| {f.verdict} | {f.check} | {_redact(f.summary, external)}"
        f"{' [' + f.quirk + ']' if f.quirk else ''} | {f.fix or ''} |"
        for f in findings
    )
    details = _redact(json.dumps(to_dict(m, findings)["measurements"], indent=2, sort_keys=True), external)
    igd = m.igd or {}
    model = " ".join(str(igd.get(k) or "") for k in ("manufacturer", "model_name", "model_number")).strip()
    return (
        "# autonat doctor report\n\n"
        f"- router: {model or 'unknown model'} ({igd.get('friendly_name') or 'no UPnP description'})\n"
        f"- protocol selected: {m.selected or 'none'}\n"
        f"- external address: {_redact(m.external_ip or 'unknown', external)} ({m.external_kind or 'unknown kind'})\n"
        f"- run: {m.elapsed:.1f} s{' (--quick)' if m.quick else ''}, exit status {exit_status(findings)}\n\n"
        "| verdict | check | what was seen | what to do |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        "<details><summary>measurements</summary>\n\n```json\n"
        f"{details}\n```\n\n</details>\n"
    ) + ("" if trace is None else _trace_section(trace, external))


def masked(report: str, address: str) -> bool:
    """Does `report` keep `address` out of sight? (For tests and the CLI's own check.)"""
    return _address(address).search(report) is None
