"""Ray Data batch pipeline around the `cogvlm` engine: shards in, one Parquet file per shard out.

Names are imported lazily, so that a read task importing `pipeline.readers` does not pay for
torch and the model code.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ConfigError": "pipeline.config", "JobConfig": "pipeline.config", "load_config": "pipeline.config",
    "InputError": "pipeline.errors", "JobError": "pipeline.errors", "run": "pipeline.job",
    "Processor": "pipeline.processor", "build_processor": "pipeline.processor",
    "CogVLMProcessorConfig": "pipeline.processor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
