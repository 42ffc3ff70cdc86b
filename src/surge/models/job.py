"""The job queue's tables (defined in ``surge.kit.jobs.schema``) on the models' ``MetaData``,
so Alembic's autogenerate sees them and never proposes dropping them. The kit owns the
definition because it must not import ``surge.models``; this module only attaches it."""

from __future__ import annotations

from surge.kit.jobs.schema import define_tables
from surge.models.base import Base

tables = define_tables(Base.metadata)
jobs_table = tables["jobs"]

__all__ = ["jobs_table", "tables"]
