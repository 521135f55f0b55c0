"""Many tenants: key source, limits, webhook secret and revocation; jobs' reserved tokens
and webhooks; batches' webhooks; idempotency keys, webhook deliveries, image owners; the
index the dispatcher reads held interactive jobs through

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import storage.models
from storage.models import INTERACTIVE_HELD, WEBHOOK_DUE

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
UTC_COLUMN = storage.models.UTCDateTime(timezone=True)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def upgrade() -> None:
    # Nullable or with a server default: adding them rewrites no row.
    op.add_column(
        "api_keys", sa.Column("source", sa.String(16), nullable=False, server_default="env")
    )
    op.add_column("api_keys", sa.Column("limits", JSON, nullable=True))
    op.add_column("api_keys", sa.Column("webhook_secret", sa.String(100), nullable=True))
    op.add_column("api_keys", sa.Column("revoked_at", UTC_COLUMN, nullable=True))
    op.add_column("api_keys", sa.Column("updated_at", UTC_COLUMN, nullable=True))
    op.execute("UPDATE api_keys SET source = 'builtin' WHERE id = 'key_auth_off'")
    op.add_column("jobs", sa.Column("reserved_tokens", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("webhook_url", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("webhook_events", JSON, nullable=True))
    op.add_column("batches", sa.Column("webhook_url", sa.Text(), nullable=True))
    op.add_column("batches", sa.Column("webhook_events", JSON, nullable=True))
    op.create_index(
        "ix_jobs_interactive_held",
        "jobs",
        ["model", "owner_id", "priority", "id"],
        unique=False,
        postgresql_where=sa.text(INTERACTIVE_HELD),
        sqlite_where=sa.text(INTERACTIVE_HELD),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("owner_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("route", sa.String(length=100), nullable=False),
        sa.Column("body_hash", sa.String(length=64), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", JSON, nullable=True),
        sa.Column("object_id", sa.String(length=40), nullable=True),
        sa.Column("locked_until", UTC_COLUMN, nullable=True),
        sa.Column("created_at", UTC_COLUMN, nullable=False),
        sa.Column("expires_at", UTC_COLUMN, nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("owner_id", "key"),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner_id", sa.String(length=40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("object_kind", sa.String(length=16), nullable=False),
        sa.Column("object_id", sa.String(length=40), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("payload", JSON, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTC_COLUMN, nullable=False),
        sa.Column("locked_until", UTC_COLUMN, nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_COLUMN, nullable=False),
        sa.Column("delivered_at", UTC_COLUMN, nullable=True),
        sa.Column("failed_at", UTC_COLUMN, nullable=True),
        sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text(WEBHOOK_DUE),
        sqlite_where=sa.text(WEBHOOK_DUE),
    )
    op.create_index("ix_webhook_deliveries_object", "webhook_deliveries", ["object_id"])
    op.create_table(
        "image_owners",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("owner_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", UTC_COLUMN, nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("sha256", "owner_id"),
    )
    _backfill_image_owners()


def _backfill_image_owners() -> None:
    """Images sent before this revision stay readable by the keys that sent them: their
    owners are read off the jobs and conversation turns that refer to them."""
    bind = op.get_bind()
    found: set[tuple[str, str]] = set()
    queries = (
        "SELECT owner_id, CAST(request AS TEXT) FROM jobs "
        "WHERE CAST(request AS TEXT) LIKE '%sha256%'",
        "SELECT c.owner_id, CAST(m.images AS TEXT) FROM messages m "
        "JOIN conversations c ON c.id = m.conversation_id WHERE m.images IS NOT NULL",
    )
    for query in queries:
        for owner_id, document in bind.execute(sa.text(query)):
            found.update((sha, owner_id) for sha in _hashes(json.loads(document)))
    now = datetime.now(UTC)
    rows = [{"sha256": sha, "owner_id": owner, "created_at": now} for sha, owner in found]
    table = sa.table(
        "image_owners",
        sa.column("sha256"),
        sa.column("owner_id"),
        sa.column("created_at", UTC_COLUMN),
    )
    for start in range(0, len(rows), 1000):
        op.bulk_insert(table, rows[start : start + 1000])


def _hashes(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        sha = node.get("sha256")
        if isinstance(sha, str) and _SHA256.fullmatch(sha):
            yield sha
        for value in node.values():
            yield from _hashes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _hashes(value)


def downgrade() -> None:
    op.drop_table("image_owners")
    op.drop_index("ix_webhook_deliveries_object", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_jobs_interactive_held", table_name="jobs")
    for column in ("webhook_events", "webhook_url"):
        op.drop_column("batches", column)
    for column in ("webhook_events", "webhook_url", "reserved_tokens"):
        op.drop_column("jobs", column)
    for column in ("updated_at", "revoked_at", "webhook_secret", "limits", "source"):
        op.drop_column("api_keys", column)
