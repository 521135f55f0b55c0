"""Operations: a job's deadline (and the index the expiry sweep reads), its trace context

Revision ID: 0008_operations
Revises: 0007_limits
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import storage.models
from storage.models import QUEUED_WITH_DEADLINE

revision = "0008_operations"
down_revision = "0007_limits"
branch_labels = None
depends_on = None

UTC_COLUMN = storage.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("deadline_at", UTC_COLUMN, nullable=True))
    op.add_column("jobs", sa.Column("traceparent", sa.String(64), nullable=True))
    op.create_index(
        "ix_jobs_queued_deadline",
        "jobs",
        ["deadline_at"],
        unique=False,
        postgresql_where=sa.text(QUEUED_WITH_DEADLINE),
        sqlite_where=sa.text(QUEUED_WITH_DEADLINE),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_deadline", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("traceparent")
        batch.drop_column("deadline_at")
