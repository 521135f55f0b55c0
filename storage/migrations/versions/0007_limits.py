"""A key's queued interactive jobs, for max_queued_jobs (api/core/ratelimit.py)

Revision ID: 0007_limits
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import INTERACTIVE_QUEUED

revision = "0007_limits"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_owner_queued",
        "jobs",
        ["owner_id"],
        unique=False,
        postgresql_where=sa.text(INTERACTIVE_QUEUED),
        sqlite_where=sa.text(INTERACTIVE_QUEUED),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_queued", table_name="jobs")
