"""jobs.tool_calls (the tools a reply calls, found by the worker's tool-call parser) and
jobs.result_content (that reply's content without the tool-call text)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Nullable, no default: adding them rewrites no row.
    op.add_column("jobs", sa.Column("tool_calls", JSON, nullable=True))
    op.add_column("jobs", sa.Column("result_content", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "result_content")
    op.drop_column("jobs", "tool_calls")
