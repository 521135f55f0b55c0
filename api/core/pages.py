"""Cursor pagination shared by every list route (`after` = last id of the previous page)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Generic, Literal, Protocol, Self, TypeVar

from fastapi import Query
from pydantic import BaseModel

# Text SQL compares with a column: PostgreSQL text cannot hold NUL, so a query value with
# one would fail the query (a 500) rather than match nothing. Refused with a 400 instead.
NO_NUL = r"^[^\x00]*$"
After = Annotated[str | None, Query(description="Last id of the previous page", pattern=NO_NUL)]

ItemT = TypeVar("ItemT")
RowT = TypeVar("RowT")


class HasId(Protocol):
    @property
    def id(self) -> str: ...


class CursorPage(BaseModel, Generic[ItemT]):
    """OpenAI's list envelope: `data`, `first_id`, `last_id`, `has_more`."""

    object: Literal["list"] = "list"
    data: list[ItemT]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, page: Sequence[HasId], data: list[ItemT], has_more: bool) -> Self:
        """The envelope for `page` (the rows shown), given their wire form `data`."""
        return cls(
            data=data,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=has_more,
        )


def split_page(rows: Sequence[RowT], limit: int) -> tuple[Sequence[RowT], bool]:
    """Repositories are asked for `limit + 1` rows: the page, and whether more follow."""
    return rows[:limit], len(rows) > limit
