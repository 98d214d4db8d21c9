"""Replica sets: N detached, named Ray actors of one class, spread over nodes, restarted by Ray.

``raymesh/galley-0``, ``raymesh/galley-1``, ...  Any replica serves any call; callers find
them by name and fail over (``mesh.client.call_any``), since every state-changing call is
idempotent.
"""
from __future__ import annotations

from typing import Any

from mesh.client import NAMESPACE, call_any, find_replicas

__all__ = ["call_any", "deploy_replicas", "find_replicas", "replica_names"]


def replica_names(component: str, replicas: int) -> list[str]:
    return [f"{component}-{i}" for i in range(replicas)]


def deploy_replicas(cls: Any, component: str, replicas: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Create (or find) the replicas of ``component``; idempotent.

    SPREAD scheduling puts replicas on different nodes where there are several, so losing a
    node leaves the component serving; ``max_restarts=-1`` lets Ray bring a replica back and
    ``max_task_retries=-1`` re-sends calls that were in flight when it died.
    """
    return [
        cls.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=0,
            scheduling_strategy="SPREAD",
        ).remote(i, *args, **kwargs)
        for i, name in enumerate(replica_names(component, replicas))
    ]
