"""The persistent judge cache: parsed judge answers keyed by (judge id, inputs).

The key hashes the judge id (model and prompt template hash), the template's name and every input
the judge reads: the text fields filled into the prompt and the content hashes of the media shown.
Media are keyed by hash, not by their rendered pictures, so a lookup renders nothing. Only answers
that parsed are stored: a failure is retried on the next call, never remembered as a score.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

from visenv.rewards.cache import MemoCache


def judge_key(judge_id: str, template: str, values: Mapping[str, str], media: Sequence[str]) -> str:
    """The cache key of one judge request (a sha256 hex digest)."""
    payload = json.dumps([judge_id, template, dict(sorted(values.items())), list(media)], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgeCache:
    """Parsed answers (field scores and the raw answer text) by :func:`judge_key`.

    Args:
        path: the SQLite file, shared by processes; None keeps answers in this process only.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.memo = MemoCache(path)

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored answers of the present keys: ``{"scores": {...}, "answer": str}``."""
        return {k: json.loads(v) for k, v in self.memo.get_many(keys).items()}

    def put_many(self, answers: Mapping[str, Mapping[str, Any]]) -> None:
        """Store parsed answers."""
        self.memo.put_many({k: json.dumps(v, ensure_ascii=False).encode() for k, v in answers.items()})

    def __repr__(self) -> str:
        return f"JudgeCache({self.memo.path!r})"
