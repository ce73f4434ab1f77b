"""Typing helpers shared by the storage modules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

AnyConnection = Union["asyncpg.Connection[asyncpg.Record]", "PoolConnectionProxy[asyncpg.Record]"]
"""A connection of its own or one borrowed from the pool: both run queries alike."""
