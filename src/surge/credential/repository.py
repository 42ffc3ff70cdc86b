"""SQL of service keys."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.web.cursor import moment
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.credential import ServiceKey

NEWEST_FIRST = Keyset((ServiceKey.created_at, ServiceKey.id), (moment, UUID), descending=True)


async def by_prefix(session: AsyncSession, prefix: str) -> ServiceKey | None:
    result = await session.execute(select(ServiceKey).where(ServiceKey.prefix == prefix))
    return result.scalar_one_or_none()


async def by_id(
    session: AsyncSession, key_id: UUID, *, for_update: bool = False
) -> ServiceKey | None:
    query = select(ServiceKey).where(ServiceKey.id == key_id)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def newest(session: AsyncSession, *, limit: int, cursor: str | None) -> Slice[ServiceKey]:
    return await keyset_page(
        session, select(ServiceKey), NEWEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )


async def add(session: AsyncSession, key: ServiceKey) -> None:
    session.add(key)
    await session.flush()
