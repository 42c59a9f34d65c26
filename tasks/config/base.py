"""What every section shares: the frozen pydantic base, the user-error type, the fingerprint hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """The user's configuration is wrong; the message says where and how."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that change how fast a stage runs but not what it writes; they are
    # left out of the stage fingerprint so tuning them does not redo work.
    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.NOT_IN_FINGERPRINT))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, input manifests)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
