"""SQL of service keys."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from surge.models.credential import ServiceKey


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


async def newest(session: AsyncSession, *, limit: int) -> list[ServiceKey]:
    query = select(ServiceKey).order_by(ServiceKey.created_at.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


async def add(session: AsyncSession, key: ServiceKey) -> None:
    session.add(key)
    await session.flush()
