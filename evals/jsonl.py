"""The first objects of a JSON-lines text, each with its line number, for task files whose errors name the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator


def jsonl_objects(lines: Iterable[str], path: str | Path, limit: int, error: type[Exception]
                  ) -> Iterator[tuple[int, dict]]:
    """(line number, object) for the first ``limit`` non-blank lines; ``error("<path>:<line>: …")`` for a line that
    is not a JSON object."""
    count = 0
    for number, line in enumerate(lines, 1):
        if count >= limit:
            return
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(item, dict):
            raise error(f"{path}:{number}: must be a JSON object, got {type(item).__name__}")
        count += 1
        yield number, item
