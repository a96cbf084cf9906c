"""Does a per-pod GPU request fit the largest node that offers that resource (and product)? Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from finetune_operator.api.common import PodResources
from finetune_operator.validation.cluster import NodeOffer
from finetune_operator.validation.review import AdmissionPolicy, Review


def check_pod_gpus(
    review: Review,
    field_path: str,
    gpus: int,
    resources: PodResources,
    nodes: Sequence[NodeOffer] | None,
    policy: AdmissionPolicy,
) -> None:
    if policy.check_gpu_shape:
        check_gpu_shape(
            review,
            field_path,
            gpus=gpus,
            resource=resources.gpu_resource_name,
            product=resources.gpu_product,
            node_selector=resources.node_selector,
            nodes=nodes,
        )


def check_gpu_shape(
    review: Review,
    field_path: str,
    *,
    gpus: int,
    resource: str,
    product: str | None,
    node_selector: Mapping[str, str],
    nodes: Sequence[NodeOffer] | None,
) -> None:
    if gpus <= 0 or nodes is None:
        return
    offering = [n for n in nodes if n.allocatable.get(resource, 0) > 0]
    matching = [
        n
        for n in offering
        if (product is None or n.product == product)
        and all(n.labels.get(key) == value for key, value in node_selector.items())
    ]
    what = resource + (f" of product {product}" if product else "")
    if node_selector:
        what += f" with labels {dict(node_selector)}"
    if not matching:
        offered = sorted({f"{n.product or 'unlabelled'} ({n.allocatable[resource]} each)" for n in offering})
        available = ", ".join(offered) if offered else "none"
        review.refuse(field_path, f"no node offers {what}; nodes offer: {available}")
        return
    largest = max(n.allocatable[resource] for n in matching)
    if gpus > largest:
        review.refuse(
            field_path,
            f"{gpus} GPUs per pod, but the largest node offering {what} has {largest}; "
            f"ask for at most {largest} per pod (and more pods)",
        )
