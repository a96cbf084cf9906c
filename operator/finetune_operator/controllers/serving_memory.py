"""What the ModelDeployment reconciler keeps between calls (`Runtime.serving`)."""

from __future__ import annotations

import aiohttp

from finetune_operator.builders.serving import ClusterFeatures
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.rollout import ServingSample


class ServingMemory:
    """The first metric reading of each canary step (its analysis window starts there), which optional
    APIs the cluster serves (looked up at most once a minute), and the HTTP session the metric reads use."""

    def __init__(self) -> None:
        self.baselines: dict[tuple[ObjectKey, str, int], ServingSample] = {}
        self.features: tuple[float, ClusterFeatures] | None = None
        self._session: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def forget(self, key: ObjectKey) -> None:
        for baseline in [b for b in self.baselines if b[0] == key]:
            del self.baselines[baseline]
