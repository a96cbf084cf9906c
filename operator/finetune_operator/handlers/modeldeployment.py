"""A first ModelDeployment handler: acknowledges the object in its status (the controller comes later)."""

from __future__ import annotations

from typing import Any

import kopf

from finetune_operator.api.common import GROUP, VERSION
from finetune_operator.controllers.modeldeployment import reconcile_modeldeployment

PLURAL = "modeldeployments"


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
async def modeldeployment_changed(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    await reconcile_modeldeployment(memo.runtime, dict(body))
