"""The daemon's log: lines an admin (and fail2ban, and journald) can use.

Three formats, one per situation:
- **text** (a terminal, a log file): `2026-12-06T02:55:01.123+00:00 autonat[1234]: WARNING message`:
  an ISO 8601 time with its zone, the program and PID as syslog writes them, the level, the message.
- **journald** (stderr is the journal's stream: `JOURNAL_STREAM` names its device and inode, as
  systemd sets it for a service): `<4>WARNING message`. The `<N>` prefix is the syslog priority
  (sd-daemon(3)), which journald strips and stores; the journal already stamps time and PID.
- **json**: one JSON object per line: `time`, `level`, `logger`, `pid`, `message`, and the record's
  structured fields (a hole's protocol, transport, addresses, lease, owner; a reload's changes).

The security records (every hole opened, changed, lost and closed: "autonat.holes"; every failed
authentication: "autonat.auth"; every config reload: "autonat.reload") are logged whatever the level.
Their lines carry their fields as `key=value` words in the text formats too, so one line says it all.

The wire trace ("autonat.trace", autonat/aio/trace.py) sets its own logger's level when it is on, so its
DEBUG records show whatever the level; they come out in these formats (JSON: with `protocol`,
`direction`, `peer`, `elapsed_ms`). A one-shot command (`probe --trace`) gets them on stderr alone
through `trace_output`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

FORMATS: Final = ("text", "json")
LEVELS: Final = ("debug", "info", "warning", "error")
ALWAYS: Final = ("autonat.holes", "autonat.auth", "autonat.reload")  # logged whatever the level
TRACE: Final = "autonat.trace"  # its level is the wire trace's own (aio/trace.py), never set here
# sd-daemon(3) priorities: <3> err, <4> warning, <6> info, <7> debug
_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def fields_of(record: logging.LogRecord) -> Mapping[str, Any]:
    """The structured fields a record carries (`extra={"fields": {...}}`), or none."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def _iso(created: float) -> str:
    return datetime.datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def _one_line(text: str) -> str:
    """A message never spans lines (a line per event is what log readers and fail2ban count on)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(record.getMessage())
        if record.exc_info:  # a bug's traceback, folded into the one line
            message += " | " + _one_line(self.formatException(record.exc_info))
        return f"{_iso(record.created)} autonat[{record.process}]: {record.levelname} {message}"


class JournaldFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(record.getMessage())
        if record.exc_info:
            message += " | " + _one_line(self.formatException(record.exc_info))
        return f"<{_PRIORITY.get(record.levelno, 6)}>{record.levelname} {message}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            line.setdefault(key, value if isinstance(value, str | int | float | bool | None) else str(value))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Is `stream` the journal's stream? systemd sets JOURNAL_STREAM to "device:inode" of it."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def configure(
    level: str = "info",
    fmt: str = "text",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Route every "autonat.*" logger to `stream` (stderr) in the format for where it goes."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = _handler(fmt, stream, environ)
    root = logging.getLogger("autonat")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in ALWAYS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.handlers.clear()  # the one-shot CLI's own stderr handler for holes: the daemon's format wins
        logger.propagate = True
    trace = logging.getLogger(TRACE)
    trace.handlers.clear()  # as for the holes: a `trace_output` handler gives way to the daemon's
    trace.propagate = True
    return handler


def _handler(fmt: str, stream: TextIO | None, environ: Mapping[str, str] | None) -> logging.Handler:
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald(out, os.environ if environ is None else environ):
        handler.setFormatter(JournaldFormatter())
    else:
        handler.setFormatter(TextFormatter())
    return handler


def trace_output(
    fmt: str = "text", *, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> logging.Handler:
    """The wire trace's records, and only those, to `stream` (stderr) in these formats: for one-shot
    commands (`probe`, `map`, `doctor` with `--trace`), whose other output is their own."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = _handler(fmt, stream, environ)
    trace = logging.getLogger(TRACE)
    trace.handlers[:] = [handler]
    trace.propagate = False
    return handler


def set_level(level: str) -> None:
    """A reload's new level (the security records stay on)."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    logging.getLogger("autonat").setLevel(level.upper())
