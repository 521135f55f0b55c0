"""jobs.logprobs (the answer's token logprobs, when asked for) and jobs.error_code (whose
fault a failure was)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Nullable, no default: adding them rewrites no row.
    op.add_column("jobs", sa.Column("logprobs", JSON, nullable=True))
    op.add_column("jobs", sa.Column("error_code", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "error_code")
    op.drop_column("jobs", "logprobs")
