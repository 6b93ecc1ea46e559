"""The shard ledger: the resume state is one small JSON marker per committed shard
(`_ledger/<shard_id>.json`, see `pipeline.layout`), written after the shard's data file is whole.

A rerun skips shards with a marker. A kill between the data file and its marker leaves a data
file without a marker; the rerun rewrites the same file name, so nothing is duplicated.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .config import RetryConfig
from .errors import retry
from .layout import OutputLayout
from .storage import fresh_exists, write_bytes_atomic

log = logging.getLogger("pipeline")


class Ledger:
    """The committed shards of one output (of one pass of its tasks: `tasks_pass`). Listing and marking retry transient store failures for
    `policy.deadline_s`, then raise TransientError; permanent failures are raised at once."""

    def __init__(self, fs: Any, root: str, policy: RetryConfig | None = None, tasks_pass: str = "") -> None:
        self.fs, self.layout = fs, OutputLayout(root, tasks_pass)
        self.policy = policy or RetryConfig()

    def done(self) -> set[str]:
        """The ids of every committed shard, listed afresh."""
        return retry(self._list, "listing the ledger", self.policy.deadline_s, self.policy.backoff_s)

    def _list(self) -> set[str]:
        folder = self.layout.ledger_dir
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return set()
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False, refresh=True)]
        return {n[: -len(".json")] for n in names if n.endswith(".json")}

    def is_done(self, shard_id: str) -> bool:
        """One fresh check of one shard's marker (never answered from a listing cache; not
        retried: callers check it inside their own attempt)."""
        return fresh_exists(self.fs, self.layout.marker(shard_id))

    def read(self, shard_id: str) -> dict[str, Any] | None:
        """A marker's record; None if it is missing or not a JSON object (one attempt)."""
        try:
            value = json.loads(self.fs.cat_file(self.layout.marker(shard_id)))
        except (FileNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def mark(self, record: dict[str, Any]) -> None:
        """Write the shard's marker (after its data file is whole): the shard is committed."""
        sid = record["shard_id"]
        retry(lambda: write_bytes_atomic(self.fs, self.layout.marker(sid), json.dumps(record).encode(),
                                         tmp_root=self.layout.root),
              f"committing shard {sid}", self.policy.deadline_s, self.policy.backoff_s)
