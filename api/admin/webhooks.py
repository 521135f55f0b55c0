"""`GET /v1/webhooks/secret`: the calling key's Standard Webhooks signing secret, made on
first use (the admin rotates it: `POST /v1/admin/keys/{id}/webhook_secret`)."""

from __future__ import annotations

from fastapi import APIRouter

from api.admin.schemas import WebhookSecret
from api.core.deps import CurrentKey, SessionDep
from api.core.errors import error_responses
from storage.repositories import api_keys

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret", response_model=WebhookSecret, responses=error_responses(401))
async def get_webhook_secret(key: CurrentKey, session: SessionDep) -> WebhookSecret:
    """The secret that signs this key's webhooks (`webhook-signature`, Standard Webhooks):
    verify deliveries with it. Made on first use; the same until the admin rotates it."""
    return WebhookSecret(secret=await api_keys.webhook_secret(session, key))
