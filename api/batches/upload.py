"""Checks on an uploaded batch file, made in one pass over the (disk-spooled) upload before
it is streamed to the object store: size, line count, and that it is JSONL at all.

Whether each line is a valid request is decided later, when a batch expands the file;
what the upload refuses is a file no batch could use: empty, not JSONL, over the limits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from api.batches.lines import split_lines
from api.core.errors import InvalidRequest, PayloadTooLarge

CHUNK = 1024 * 1024
# How many distinct `url`s a file's summary keeps (enough to spot an endpoint mismatch).
MAX_URLS = 8


@dataclass
class JsonlSummary:
    bytes: int = 0
    lines: int = 0
    json_lines: int = 0
    urls: list[str] = field(default_factory=list)


def scan_jsonl(
    source: IO[bytes], *, max_bytes: int, max_lines: int, max_line_bytes: int
) -> JsonlSummary:
    """Read `source` to its end in chunks; raise a 4xx FerryError for a file to refuse."""
    summary = JsonlSummary()

    def chunks() -> Iterator[bytes]:
        while chunk := source.read(CHUNK):
            summary.bytes += len(chunk)
            if summary.bytes > max_bytes:
                raise PayloadTooLarge(
                    f"The file is larger than {max_bytes} bytes, the most a batch file may have.",
                    param="file",
                    code="file_too_large",
                )
            yield chunk

    for raw in split_lines(chunks(), max_line_bytes):
        summary.lines += 1
        if summary.lines > max_lines:
            raise InvalidRequest(
                f"The file has more than {max_lines} lines, the most a batch file may have.",
                param="file",
                code="too_many_lines",
            )
        if raw.data is None:
            continue
        try:
            obj = json.loads(raw.data)
        except ValueError:
            continue
        if isinstance(obj, dict):
            summary.json_lines += 1
            url = obj.get("url")
            if isinstance(url, str) and url not in summary.urls and len(summary.urls) < MAX_URLS:
                summary.urls.append(url[:200])
    if summary.lines == 0:
        raise InvalidRequest(
            "The file is empty: a batch file has one JSON request per line.",
            param="file",
            code="empty_file",
        )
    if summary.json_lines == 0:
        raise InvalidRequest(
            "The file is not JSONL: none of its lines is a JSON object. Each line must be "
            '{"custom_id": ..., "method": "POST", "url": ..., "body": {...}}.',
            param="file",
            code="invalid_file_format",
        )
    return summary
