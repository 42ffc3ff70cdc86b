"""What Alembic's autogenerate compares: every model (``surge.models``) against the
database, minus the objects the migrations manage in raw SQL on purpose."""

from __future__ import annotations

import re
from typing import Any

#: Monthly partitions of the wallet history (``wallet_ensure_partitions``) and their
#: default partitions: created at run time, never declared as models.
PARTITION = re.compile(r"^(wallet_entries|wallet_earnings)_(default|\d{4}_\d{2})$")


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's ``include_object`` hook (migrations/env.py and the drift test use it)."""
    is_partition = type_ == "table" and name is not None and PARTITION.match(name) is not None
    return not is_partition
