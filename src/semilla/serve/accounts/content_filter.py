"""An optional content filter: a list of words and regular expressions refused in prompts and outputs.

The file has one entry per line: a word or phrase (matched case-insensitively on word
boundaries) or `re:<regex>`; blank lines and lines starting with `#` are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path


class ContentFilter:
    def __init__(self, patterns: list[re.Pattern] | None = None):
        self.patterns = patterns or []

    @classmethod
    def load(cls, path: str) -> ContentFilter:
        if not path:
            return cls()
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"content filter file {path} does not exist")
        patterns, problems = [], []
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("re:"):
                    patterns.append(re.compile(line[3:], re.IGNORECASE))
                else:
                    patterns.append(re.compile(rf"(?<!\w){re.escape(line)}(?!\w)", re.IGNORECASE))
            except re.error as e:
                problems.append(f"line {n}: {e}")
        if problems:
            raise ValueError(f"content filter file {path}: {'; '.join(problems)}")
        return cls(patterns)

    def blocked(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)
