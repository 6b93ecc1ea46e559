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
                                   settings, model and weights format), written by its first run,
                                   and the task passes added since (`output.add_tasks`)

Tasks added to an existing output (`output.add_tasks`) form a pass of their own, named by its
tasks (e.g. `vqa`), with its own ledger, parts and claims, so that its rows are committed exactly
once whatever the first tasks' state:

    data/<shard_id>+<pass>.parquet the pass's rows of one shard (shard ids never hold '+')
    _passes/<pass>/_ledger/, _parts/, _claims/   as above, for the pass

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
PASSES = "_passes"
PASS_MARK = "+"  # between a shard id and a pass name in a data file's name; never in a shard id


@dataclass(frozen=True)
class OutputLayout:
    """Paths under `root` (an output prefix without scheme, as `storage.filesystem` gives it).
    `tasks_pass`: "" for the output's first tasks, else the name of a pass of added tasks, whose
    data files, ledger, parts and claims are its own (the run records and `_tmp/` are shared)."""

    root: str
    tasks_pass: str = ""

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _work(self, *parts: str) -> str:
        """A path of this pass's ledger, parts or claims."""
        if self.tasks_pass:
            return self._join(PASSES, self.tasks_pass, *parts)
        return self._join(*parts)

    def for_pass(self, tasks_pass: str) -> "OutputLayout":
        return OutputLayout(self.root, tasks_pass)

    # committed results
    @property
    def output_manifest(self) -> str:
        return self._join(OUTPUT)

    @property
    def data_dir(self) -> str:
        return self._join(DATA)

    def data_file(self, shard_id: str) -> str:
        return self._join(self.data_rel(shard_id))

    def data_rel(self, shard_id: str) -> str:
        """The data file's path relative to the root (as ledger markers record it)."""
        suffix = f"{PASS_MARK}{self.tasks_pass}" if self.tasks_pass else ""
        return posixpath.join(DATA, f"{shard_id}{suffix}.parquet")

    @staticmethod
    def data_name_shard(name: str) -> tuple[str, str]:
        """(shard id, pass) of a data file's name (`<shard_id>[+<pass>].parquet`)."""
        stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
        sid, _, tasks_pass = stem.partition(PASS_MARK)
        return sid, tasks_pass

    @property
    def ledger_dir(self) -> str:
        return self._work(LEDGER)

    def marker(self, shard_id: str) -> str:
        return self._work(LEDGER, f"{shard_id}.json")

    # work in progress
    @property
    def parts_root(self) -> str:
        return self._work(PARTS)

    def parts_dir(self, shard_id: str) -> str:
        return self._work(PARTS, shard_id)

    def part_rel(self, shard_id: str, run_id: str, unique: str) -> str:
        """A part's path relative to the root (as part records carry it)."""
        base = posixpath.join(PASSES, self.tasks_pass) if self.tasks_pass else ""
        return posixpath.join(base, PARTS, shard_id, f"{run_id}-{unique}.parquet")

    @staticmethod
    def is_part_of_run(name: str, run_id: str) -> bool:
        """Whether a part's file name is one `part_rel` made for `run_id`."""
        return re.fullmatch(re.escape(run_id) + r"-[0-9a-f]{32}\.parquet", name) is not None

    @property
    def claims_dir(self) -> str:
        return self._work(CLAIMS)

    def claim(self, shard_id: str) -> str:
        return self._work(CLAIMS, f"{shard_id}.json")

    @property
    def claims_lock(self) -> str:
        return self._work(CLAIMS, ".lock")

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
