"""The run's driver-side actors (claim keeper, crash ledger) live on the driver's node.

A worker node can go away at any time (spot preemption); the driver's node cannot without ending
the run anyway. An actor the run needs to its end is therefore pinned there (a hard node
affinity), reserves no CPU, and dies with the driver.
"""

from __future__ import annotations

from typing import Any


def on_driver_node(cls: type, *args: Any, max_concurrency: int = 1) -> Any:
    """`cls(*args)` started as a Ray actor on this (the driver's) node; returns its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_concurrency=max_concurrency)(cls).options(
        scheduling_strategy=here).remote(*args)
