"""Ray Data batch pipeline around the `cogvlm` engine: shards in, one Parquet file per shard out."""

from .config import ConfigError, JobConfig, load_config
from .readers import InputError
from .run import JobError, run

__all__ = ["ConfigError", "InputError", "JobConfig", "JobError", "load_config", "run"]
