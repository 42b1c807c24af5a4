"""Server-sent events: an incremental parser and the encoder."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: str


class SSEParser:
    """Incremental text/event-stream parser (WHATWG): feed raw bytes, get complete events."""

    __slots__ = ("_buf", "_skip_lf", "_bom", "_data", "_event", "last_event_id", "retry")

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # the previous chunk ended in \r; a leading \n belongs to it
        self._bom = True  # still at stream start, where a UTF-8 BOM is dropped
        self._data: list[str] | None = None
        self._event: str | None = None
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        buf = self._buf + chunk if self._buf else chunk
        if self._bom:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._buf = buf
                return []
            self._bom = False
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        if self._skip_lf and buf:
            self._skip_lf = False
            if buf[0] == 10:
                buf = buf[1:]
        events: list[SSEEvent] = []
        if b"\r" not in buf:
            # Nearly every provider ends lines with \n alone: one split instead of a search per line.
            *lines, rest = buf.split(b"\n")
            for raw in lines:
                self._line(raw, events)
            self._buf = rest
            return events
        n = len(buf)
        start = 0
        # Lines split on ASCII bytes only, so a UTF-8 sequence cut by the chunking is never decoded half.
        nr = buf.find(b"\r")
        nn = buf.find(b"\n")
        while nr != -1 or nn != -1:
            if nn == -1 or (nr != -1 and nr < nn):
                end = nr
                if end + 1 < n:
                    nxt = end + 2 if buf[end + 1] == 10 else end + 1
                else:
                    nxt = n
                    self._skip_lf = True
            else:
                end = nn
                nxt = nn + 1
            self._line(buf[start:end], events)
            start = nxt
            if nr != -1 and nr < start:
                nr = buf.find(b"\r", start)
            if nn != -1 and nn < start:
                nn = buf.find(b"\n", start)
        self._buf = buf[start:] if start < n else b""
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if not raw:
            if self._data is not None:
                events.append(SSEEvent(self._event, "\n".join(self._data)))
            self._data = None
            self._event = None
            return
        if raw[0] == 58:  # ":" comment, used for keep-alives
            return
        line = raw.decode("utf-8", "replace")
        field, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if field == "data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif field == "event":
            self._event = value or None
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)


def sse_encode(data: str, event: str | None = None) -> bytes:
    if "\n" in data or "\r" in data:
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        body = "".join(f"data: {line}\n" for line in lines)
    else:
        body = f"data: {data}\n"
    if event is not None:
        body = f"event: {event}\n{body}"
    return (body + "\n").encode()
