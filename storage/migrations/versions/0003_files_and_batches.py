"""files, batches and their line errors; jobs.batch_id / custom_id

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import storage.models
from storage.models import BATCH_OUTSTANDING, BATCH_UNSENT, INTERACTIVE_OPEN

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
UTC = storage.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner_id", sa.String(length=40), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("urls", JSON, nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_files_owner_id_id", "files", ["owner_id", "id"], unique=False)
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=40), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("metadata", JSON, nullable=True),
        sa.Column("errors", JSON, nullable=True),
        sa.Column("request_total", sa.Integer(), nullable=False),
        sa.Column("invalid_count", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(length=40), nullable=True),
        sa.Column("error_file_id", sa.String(length=40), nullable=True),
        sa.Column("lease_expires_at", UTC, nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("in_progress_at", UTC, nullable=True),
        sa.Column("finalizing_at", UTC, nullable=True),
        sa.Column("completed_at", UTC, nullable=True),
        sa.Column("failed_at", UTC, nullable=True),
        sa.Column("expired_at", UTC, nullable=True),
        sa.Column("cancelling_at", UTC, nullable=True),
        sa.Column("cancelled_at", UTC, nullable=True),
        sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batches_owner_id_id", "batches", ["owner_id", "id"], unique=False)
    op.create_index("ix_batches_status", "batches", ["status"], unique=False)
    op.create_table(
        "batch_line_errors",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(length=256), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("param", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_batch_line_errors_batch_id_line",
        "batch_line_errors",
        ["batch_id", "line"],
        unique=False,
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("custom_id", sa.String(length=256), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_batch_id", "batches", ["batch_id"], ["id"], ondelete="CASCADE"
        )
    op.create_index("ux_jobs_batch_id_custom_id", "jobs", ["batch_id", "custom_id"], unique=True)
    op.create_index("ix_jobs_batch_id_status", "jobs", ["batch_id", "status"], unique=False)
    op.create_index(
        "ix_jobs_batch_unsent",
        "jobs",
        ["model", "id"],
        unique=False,
        postgresql_where=sa.text(BATCH_UNSENT),
        sqlite_where=sa.text(BATCH_UNSENT),
    )
    op.create_index(
        "ix_jobs_batch_outstanding",
        "jobs",
        ["model"],
        unique=False,
        postgresql_where=sa.text(BATCH_OUTSTANDING),
        sqlite_where=sa.text(BATCH_OUTSTANDING),
    )
    op.create_index(
        "ix_jobs_interactive_open",
        "jobs",
        ["model"],
        unique=False,
        postgresql_where=sa.text(INTERACTIVE_OPEN),
        sqlite_where=sa.text(INTERACTIVE_OPEN),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_interactive_open", table_name="jobs")
    op.drop_index("ix_jobs_batch_outstanding", table_name="jobs")
    op.drop_index("ix_jobs_batch_unsent", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_status", table_name="jobs")
    op.drop_index("ux_jobs_batch_id_custom_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_batch_id", type_="foreignkey")
        batch.drop_column("custom_id")
        batch.drop_column("batch_id")
    op.drop_index("ix_batch_line_errors_batch_id_line", table_name="batch_line_errors")
    op.drop_table("batch_line_errors")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_owner_id_id", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_files_owner_id_id", table_name="files")
    op.drop_table("files")
