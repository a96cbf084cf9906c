"""Licence allowlist and the provenance digest of the configuration."""

from __future__ import annotations

import hashlib
import json

from finetune_trainer.data.config import ComplianceConfig, DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.report import LicenceRecord

__all__ = ["check_licences", "config_digest"]


def config_digest(cfg: DataConfig, exclude: set[str] | None = None) -> str:
    """SHA-256 of the data config as canonical JSON (camelCase, sorted keys): equal configs, equal digests.
    ``exclude``: sections (field names) left out."""
    dumped = cfg.model_dump(mode="json", by_alias=True, exclude=exclude)
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_licences(cfg: ComplianceConfig, *, model_license: str | None) -> LicenceRecord:
    """Enforce the allowlist when one is configured. The config's modelLicense wins over ``model_license``
    (what the trainer read from the model's card). With an allowlist, an unknown licence is refused: the job
    cannot prove compliance."""
    dataset = cfg.dataset_license
    model = cfg.model_license or model_license
    record = LicenceRecord(dataset=dataset, model=model, allowed=list(cfg.allowed_licenses))
    if not cfg.allowed_licenses:
        return record
    allowed = {name.strip().lower() for name in cfg.allowed_licenses}
    problems = []
    for what, licence in (("dataset", dataset), ("base model", model)):
        if licence is None:
            problems.append(f"the {what} licence is unknown (set compliance.{_field(what)})")
        elif licence.strip().lower() not in allowed:
            problems.append(f"the {what} licence {licence!r} is not in allowedLicenses")
    if problems:
        raise DataError(
            "Licence check failed: " + "; ".join(problems) + f". Allowed: {sorted(cfg.allowed_licenses)}.",
            reason="LicenseNotAllowed",
        )
    return record.model_copy(update={"checked": True})


def _field(what: str) -> str:
    return "datasetLicense" if what == "dataset" else "modelLicense"
