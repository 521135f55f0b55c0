"""Wire types of the admin API: a key as the admin sees it, and what creates or changes one."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.core.limits import KeyLimits, stored_limits
from api.core.pages import CursorPage
from storage.models import ApiKey

# Stripped, so that "   " is as empty as "" (the column holds 200 characters).
KeyName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: KeyName = Field(description="Who or what the key is for (1 to 200 characters).")
    limits: KeyLimits = Field(
        default_factory=KeyLimits,
        description="The key's own limits; a field left out takes the deployment's default.",
    )


class KeyUpdate(BaseModel):
    """Fields left out stay as they are. In `limits`, each field given replaces the stored
    one and `null` clears it (back to the deployment's default)."""

    model_config = ConfigDict(extra="forbid")

    name: KeyName | None = None
    limits: KeyLimits | None = None


class KeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str | None
    source: str = Field(
        description="`admin` (made here), `env` (FERRY_API_KEYS) or `builtin` (auth off)"
    )
    limits: KeyLimits = Field(description="The key's own limits, as stored")
    effective_limits: KeyLimits = Field(
        description="What applies: the key's own limits over the deployment's defaults"
    )
    created_at: int
    revoked_at: int | None

    @classmethod
    def from_row(cls, row: ApiKey, defaults: KeyLimits) -> KeyPublic:
        own = stored_limits(row.limits)
        return cls(
            id=row.id,
            name=row.name,
            source=row.source,
            limits=own,
            effective_limits=own.over(defaults),
            created_at=int(row.created_at.timestamp()),
            revoked_at=int(row.revoked_at.timestamp()) if row.revoked_at else None,
        )


class KeyCreated(KeyPublic):
    key: str = Field(description="The bearer token: shown this once, stored only hashed")


class KeyList(CursorPage[KeyPublic]):
    pass


class KeyDeleted(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    deleted: bool = True


class WebhookSecret(BaseModel):
    object: Literal["webhook.secret"] = "webhook.secret"
    secret: str = Field(
        description="Standard Webhooks signing secret: `whsec_` and base64 of its bytes"
    )
