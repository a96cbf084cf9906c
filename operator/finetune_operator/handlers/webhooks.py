"""Admission webhooks: thin kopf handlers over the pure reviews (validation/) and the audit log.

Paths end in the handler id (kopf routes by it); builders/webhooks.py points each webhook there. The
services are in `memo.webhooks` (set at startup only when webhooks are on).
"""

from __future__ import annotations

from typing import Any, Literal

import kopf

from finetune_operator.api.common import GROUP, VERSION
from finetune_operator.api.finetunejob import KIND as FINETUNEJOB
from finetune_operator.api.finetunejob import PLURAL as FINETUNEJOBS
from finetune_operator.api.modeldeployment import KIND as MODELDEPLOYMENT
from finetune_operator.api.modeldeployment import PLURAL as MODELDEPLOYMENTS
from finetune_operator.builders.webhooks import (
    AUDIT_DELETE,
    SET_CREATED_BY,
    VALIDATE_FINETUNEJOB,
    VALIDATE_MODELDEPLOYMENT,
)
from finetune_operator.validation import CREATED_BY
from finetune_operator.validation.defaults import defaults_patch
from finetune_operator.webhooks import WebhookServices, cluster_defaults, review_request

KINDS = {FINETUNEJOBS: FINETUNEJOB, MODELDEPLOYMENTS: MODELDEPLOYMENT}


def _services(memo: Any) -> WebhookServices:
    services: WebhookServices | None = getattr(memo, "webhooks", None)
    if services is None:  # a request before startup finished: refuse rather than admit unreviewed
        raise kopf.AdmissionError("the operator is starting; retry in a few seconds", code=503)
    return services


CREATE_UPDATE: list[Literal["CREATE", "UPDATE"]] = ["CREATE", "UPDATE"]


@kopf.on.validate(GROUP, VERSION, FINETUNEJOBS, id=VALIDATE_FINETUNEJOB, operations=CREATE_UPDATE)
@kopf.on.validate(GROUP, VERSION, MODELDEPLOYMENTS, id=VALIDATE_MODELDEPLOYMENT, operations=CREATE_UPDATE)
@kopf.on.validate(GROUP, VERSION, FINETUNEJOBS, id=AUDIT_DELETE, operations=["DELETE"])
@kopf.on.validate(GROUP, VERSION, MODELDEPLOYMENTS, id=AUDIT_DELETE, operations=["DELETE"])
async def review(
    *,
    body: kopf.Body,
    userinfo: kopf.UserInfo,
    dryrun: bool,
    resource: kopf.Resource,
    memo: Any,
    **kwargs: Any,
) -> None:
    old = kwargs.get("old")
    await review_request(
        _services(memo),
        kind=KINDS[resource.plural],
        operation=str(kwargs["operation"]),
        body=body,
        old=dict(old) if old is not None else None,
        userinfo=dict(userinfo),
        dryrun=dryrun,
    )


@kopf.on.mutate(GROUP, VERSION, FINETUNEJOBS, id=SET_CREATED_BY, operations=["CREATE"])
@kopf.on.mutate(GROUP, VERSION, MODELDEPLOYMENTS, id=SET_CREATED_BY, operations=["CREATE"])
async def set_created_by(
    *,
    body: kopf.Body,
    userinfo: kopf.UserInfo,
    patch: kopf.Patch,
    resource: kopf.Resource,
    memo: Any,
    **_: Any,
) -> None:
    """The requesting user, as the API server authenticated them (whatever the request itself said), and
    the defaults that depend on the cluster's state for what the request left unset."""
    found = await cluster_defaults(_services(memo).client, KINDS[resource.plural], body)
    filled = defaults_patch(KINDS[resource.plural], body, found)
    if filled:
        patch.spec.update(filled["spec"])
        patch.metadata.setdefault("annotations", {}).update(filled["metadata"]["annotations"])
    patch.metadata.setdefault("annotations", {})[CREATED_BY] = str(userinfo.get("username", ""))
