"""workers: each worker's devices, host memory and queues (its heartbeat); a job's devices_per_job

Revision ID: 0005_workers
Revises: 0004_webhooks
Create Date: 2026-12-03
"""

from alembic import op
import sqlalchemy as sa


revision = '0005_workers'
down_revision = '0004_webhooks'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('worker_class', sa.String(length=64), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('devices', sa.JSON(), nullable=False),
    sa.Column('host_total', sa.BigInteger(), nullable=False),
    sa.Column('host_available', sa.BigInteger(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('devices_per_job', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('devices_per_job')
    op.drop_table('workers')
