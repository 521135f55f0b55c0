"""Retention: the indexes the sweep reads by age, and when each image was last used

Revision ID: 0009_retention
Revises: 0008_operations
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import storage.models
from storage.models import (
    BATCH_ENDED,
    IN_CONVERSATION,
    UNBATCHED_FINISHED,
    WEBHOOK_DONE,
    WITH_IMAGES,
)

revision = "0009_retention"
down_revision = "0008_operations"
branch_labels = None
depends_on = None

UTC_COLUMN = storage.models.UTCDateTime(timezone=True)

# (name, table, columns, partial predicate or None)
INDEXES = [
    ("ix_jobs_unbatched_finished", "jobs", ["finished_at"], UNBATCHED_FINISHED),
    ("ix_jobs_conversation_id", "jobs", ["conversation_id"], IN_CONVERSATION),
    ("ix_conversations_updated_at", "conversations", ["updated_at"], None),
    ("ix_messages_with_images", "messages", ["conversation_id"], WITH_IMAGES),
    ("ix_files_created_at", "files", ["created_at"], None),
    ("ix_batches_ended_created_at", "batches", ["created_at"], BATCH_ENDED),
    ("ix_webhook_deliveries_done", "webhook_deliveries", ["created_at"], WEBHOOK_DONE),
    ("ix_image_owners_last_used_at", "image_owners", ["last_used_at"], None),
]


def upgrade() -> None:
    # Uses before this revision are unknown, so an image counts as used now: every job or
    # message already referring to it was made before that, as the sweep assumes.
    # (Batch mode: SQLite adds such a column only by copying the table.)
    with op.batch_alter_table("image_owners") as batch:
        batch.add_column(
            sa.Column("last_used_at", UTC_COLUMN, nullable=False, server_default=sa.func.now())
        )
    for name, table, columns, where in INDEXES:
        predicate = sa.text(where) if where else None
        op.create_index(
            name,
            table,
            columns,
            unique=False,
            postgresql_where=predicate,
            sqlite_where=predicate,
        )


def downgrade() -> None:
    for name, table, _columns, _where in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table("image_owners") as batch:
        batch.drop_column("last_used_at")
