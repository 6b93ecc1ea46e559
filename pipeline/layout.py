"""Where everything lives under a job's output prefix; the only module that spells these paths.

    data/<shard_id>.parquet        all rows of one input shard, written whole, then...
    _ledger/<shard_id>.json        ...this marker: the shard is committed (counts, run id, file)
    _parts/<shard_id>/<run_id>-<uuid>.parquet
                                   rows the replicas wrote, merged into data/ at the commit, then deleted
    _claims/<shard_id>.json        a live run's lease on a shard it is processing
    _runs/<run_id>/summary.json    one per run, with config.yaml (the resolved config) and
                                   progress.json (while it runs) beside it
    _tmp/                          local outputs: files being written, renamed into place when whole
    _output.json                   the config that made the output (tasks, prompts, generation
                                   settings, model and weights format), written by its first run

Shard ids never start with '_' or '.', so dataset readers (pandas, pyarrow, DuckDB) see only
`data/`. A rerun skips shards with a marker; a kill between a data file and its marker leaves a
file without a marker, and the rerun rewrites the same name, so nothing is duplicated.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

DATA = "data"
LEDGER = "_ledger"
PARTS = "_parts"
CLAIMS = "_claims"
RUNS = "_runs"
TMP = "_tmp"
OUTPUT = "_output.json"


@dataclass(frozen=True)
class OutputLayout:
    """Paths under `root` (an output prefix without scheme, as `storage.filesystem` gives it)."""

    root: str

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # committed results
    @property
    def output_manifest(self) -> str:
        return self._join(OUTPUT)

    @property
    def data_dir(self) -> str:
        return self._join(DATA)

    def data_file(self, shard_id: str) -> str:
        return self._join(self.data_rel(shard_id))

    @staticmethod
    def data_rel(shard_id: str) -> str:
        """The data file's path relative to the root (as ledger markers record it)."""
        return posixpath.join(DATA, f"{shard_id}.parquet")

    @property
    def ledger_dir(self) -> str:
        return self._join(LEDGER)

    def marker(self, shard_id: str) -> str:
        return self._join(LEDGER, f"{shard_id}.json")

    # work in progress
    @property
    def parts_root(self) -> str:
        return self._join(PARTS)

    def parts_dir(self, shard_id: str) -> str:
        return self._join(PARTS, shard_id)

    @staticmethod
    def part_rel(shard_id: str, run_id: str, unique: str) -> str:
        """A part's path relative to the root (as part records carry it)."""
        return posixpath.join(PARTS, shard_id, f"{run_id}-{unique}.parquet")

    @staticmethod
    def is_part_of_run(name: str, run_id: str) -> bool:
        """Whether a part's file name is one `part_rel` made for `run_id`."""
        return re.fullmatch(re.escape(run_id) + r"-[0-9a-f]{32}\.parquet", name) is not None

    @property
    def claims_dir(self) -> str:
        return self._join(CLAIMS)

    def claim(self, shard_id: str) -> str:
        return self._join(CLAIMS, f"{shard_id}.json")

    @property
    def claims_lock(self) -> str:
        return self._join(CLAIMS, ".lock")

    # run records
    @property
    def runs_dir(self) -> str:
        return self._join(RUNS)

    def run_dir(self, run_id: str) -> str:
        return self._join(RUNS, run_id)

    def summary(self, run_id: str) -> str:
        return self._join(RUNS, run_id, "summary.json")

    def config(self, run_id: str) -> str:
        return self._join(RUNS, run_id, "config.yaml")

    def progress(self, run_id: str) -> str:
        return self._join(RUNS, run_id, "progress.json")

    def probe(self, tag: str) -> str:
        """A file the job writes and removes to check the output is writable (hidden: '.')."""
        return self._join(RUNS, f".probe-{tag}")

    # local outputs: temporary files, renamed into place when whole
    @property
    def tmp_dir(self) -> str:
        return self._join(TMP)
