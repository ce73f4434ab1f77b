"""Warm tokens in memory, kept honest by the database's change feed.

GetAccessToken answers from here without touching PostgreSQL. Every replica
listens to the table's change notifications (``broker.storage.notifications``);
a change to a row drops that row's entry everywhere, so a revocation, a
refresh on another replica or a hand-edited ``refresh_token_created_at`` is
seen within milliseconds.

Two races are closed here rather than hoped away:

- A reader that fetched a row just before another replica changed it must not
  park the stale copy after the change notice went by. Readers take a
  ``ticket`` before they read; ``put`` refuses a snapshot when a newer version
  of that realm was announced after the ticket (or when the ticket is too old
  to tell).
- While the change feed is down notices can be missed: nothing is served from
  memory (``get`` answers None, so callers read the database) and nothing new is
  cached; the entries stay only as ``last_known``, the fallback for when the
  database cannot be read either. When the feed comes back, they are dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from broker.domain.model import ConnectionStatus, TokenSnapshot

_NEWER_THAN_ANY = 2**63 - 1  # bigger than any row_version PostgreSQL can hold


@dataclass(frozen=True, slots=True)
class ChangeNotice:
    realm_id: str
    row_version: int
    user_id: str | None = None
    deleted: bool = False


class ChangeListener(Protocol):
    """Told of every change to a connection row, by the change feed."""

    def apply(self, notice: ChangeNotice) -> None: ...

    def feed_lost(self) -> None:
        """Notices may be missed from now on."""
        ...

    def feed_restored(self) -> None:
        """Notices flow again; some in between may have been missed."""
        ...


class TokenCache:
    def __init__(self, *, max_entries: int = 100_000, remembered_notices: int = 4096) -> None:
        self._max_entries = max_entries
        self._entries: dict[str, TokenSnapshot] = {}
        self._realm_of_user: dict[str, str] = {}
        self._sequence = 0
        self._notices: deque[tuple[int, str, int]] = deque(maxlen=remembered_notices)
        self._accepting = False

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, realm_id: str) -> TokenSnapshot | None:
        """The cached snapshot, while the change feed vouches for it."""
        return self._entries.get(realm_id) if self._accepting else None

    def last_known(self, realm_id: str) -> TokenSnapshot | None:
        """The cached snapshot even while the feed is down (a fallback, not an answer)."""
        return self._entries.get(realm_id)

    def realm_of_user(self, user_id: str) -> str | None:
        return self._realm_of_user.get(user_id) if self._accepting else None

    def ticket(self) -> int:
        """Take before reading the database; hand back to ``put``."""
        return self._sequence

    def put(self, snapshot: TokenSnapshot, ticket: int, *, sole_for_user: bool = False) -> None:
        """Cache ``snapshot``; ``sole_for_user`` when it was found as its user's only connection."""
        if not self._accepting or snapshot.status is not ConnectionStatus.ACTIVE:
            return
        if self._announced_newer(snapshot, ticket):
            return
        realm_id = snapshot.realm_id
        previous = self._entries.pop(realm_id, None)
        if previous is not None and previous.row_version > snapshot.row_version:
            self._entries[realm_id] = previous
            return
        if previous is None and len(self._entries) >= self._max_entries:
            self._evict_oldest()
        self._entries[realm_id] = snapshot
        if sole_for_user:
            self._realm_of_user[snapshot.user_id] = realm_id

    def apply(self, notice: ChangeNotice) -> None:
        """A row changed somewhere: forget what we knew of it if it is older."""
        self._sequence += 1
        self._notices.append((self._sequence, notice.realm_id, notice.row_version))
        if notice.user_id is not None:
            # A new or moved connection may make a user_id ambiguous, or point elsewhere.
            self._realm_of_user.pop(notice.user_id, None)
        entry = self._entries.get(notice.realm_id)
        if entry is not None and (notice.deleted or entry.row_version < notice.row_version):
            self._drop(notice.realm_id)

    def forget(self, realm_id: str) -> None:
        """This process just changed the row: drop our copy now, not when the notice comes."""
        self.apply(ChangeNotice(realm_id, _NEWER_THAN_ANY))

    def feed_lost(self) -> None:
        """Serve nothing from memory and cache nothing new until the feed is back."""
        self._accepting = False

    def feed_restored(self) -> None:
        """Notices may have been missed: start over."""
        self._entries.clear()
        self._realm_of_user.clear()
        self._sequence += 1
        self._notices.clear()
        self._accepting = True

    def _announced_newer(self, snapshot: TokenSnapshot, ticket: int) -> bool:
        if ticket == self._sequence:
            return False
        if not self._notices or self._notices[0][0] > ticket + 1:
            return True  # the notices since the ticket are no longer all remembered
        for sequence, realm_id, version in reversed(self._notices):
            if sequence <= ticket:
                break
            if realm_id == snapshot.realm_id and version > snapshot.row_version:
                return True
        return False

    def _drop(self, realm_id: str) -> None:
        entry = self._entries.pop(realm_id, None)
        if entry is not None and self._realm_of_user.get(entry.user_id) == realm_id:
            del self._realm_of_user[entry.user_id]

    def _evict_oldest(self) -> None:
        self._drop(next(iter(self._entries)))
