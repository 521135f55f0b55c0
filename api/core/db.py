"""`Database`: the one way the API opens a session of its own (see the rule in `api`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


class Database:
    """Short units of work: `read()` for reads, `transaction()` for reads and writes.

    Each opens its own session and holds a pooled connection only until its block ends,
    so a unit may sit inside a stream or a long wait without holding one for all of it.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    def read(self) -> AsyncSession:
        """`async with db.read() as session:` reads only; nothing is committed (closing
        the session ends its transaction)."""
        return self.sessions()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """`async with db.transaction() as session:` one transaction, committed when the
        block ends normally, rolled back when it raises. A commit inside the block (when
        something outside SQL must follow it) is allowed: what comes after it is
        committed at the end."""
        async with self.sessions() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
