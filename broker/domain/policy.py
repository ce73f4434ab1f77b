"""When to refresh, and what a refresh changes: the hybrid renewal policy.

Two clocks run on every connection. The access token lives an hour; the
refresh token lives ~101 days from the moment Intuit *issued that value* and
Intuit only issues a new value once the current one is about a day old. The
policy keeps both alive:

- on use, an access token that would not last ``min_validity`` is refreshed
  (trigger ``access_expiry``);
- on use, a refresh token at least ``proactive_age`` old is renewed even when
  the access token is fine (trigger ``proactive``);
- the weekly sweep renews idle connections whose refresh token is at least
  ``background_age`` old, or that would expire before the next sweep (trigger
  ``sweep``).

The dates are tracked truthfully: ``refresh_token_created_at`` moves to "now"
only when Intuit hands out a different value, so a refresh within Intuit's
24-hour window does not pretend the 101 days restarted. When Intuit hands back
the same value, its ``x_refresh_token_expires_in`` says how much of the 101
days is left, which dates the token: an unknown issue time (a grant imported
without one) is learnt from it, and a recorded one that is off by more than an
hour (aged by hand, imported wrong) is corrected, for every replica and the
sweep at once, instead of being renewed again at every use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broker.domain.model import (
    INTUIT_REFRESH_TOKEN_LIFETIME,
    ConnectionStatus,
    ImportRequest,
    IssuedTokens,
    LockedConnection,
    LostCause,
    TokenSnapshot,
    TokenUpdate,
    Trigger,
)

DEFAULT_PROACTIVE_AGE = timedelta(days=30)
DEFAULT_BACKGROUND_AGE = timedelta(days=60)
_AGE_TOLERANCE = timedelta(hours=1)
SWEEP_SAFETY_MARGIN = timedelta(days=2)
"""The sweep also renews what would expire within this long after its next run."""
HARD_LIMIT_SLACK = timedelta(days=1)
ROTATION_POSSIBLE_AFTER = timedelta(hours=20)
"""Intuit rotates a refresh token once it is about a day old (24-26 hours); from
20 hours on, a refresh is treated as one that may rotate (and is announced)."""
_NULLS_FIRST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SweepCutoffs:
    """The sweep's selection rule at one moment: the one statement of "due".

    A connection is due when it is active and its refresh token was issued at
    or before ``created_by`` (or at an unknown time), or it expires at or
    before ``expires_by`` unless that expiry is within ``hard_limit_slack`` of
    its reconnect deadline (Intuit's five-year limit, which no refresh moves).
    ``due`` tests one snapshot; ``broker.storage.sweep`` passes the same three
    values to its SQL, and a test holds the two to the same answers.
    """

    created_by: datetime
    expires_by: datetime
    hard_limit_slack: timedelta = HARD_LIMIT_SLACK

    def due(self, snapshot: TokenSnapshot) -> bool:
        if snapshot.status is not ConnectionStatus.ACTIVE:
            return False
        created = snapshot.refresh_token_created_at
        if created is None or created <= self.created_by:
            return True
        expires = snapshot.refresh_token_expires_at
        if expires is None or expires > self.expires_by:
            return False
        deadline = snapshot.reconnect_deadline
        return deadline is None or expires < deadline - self.hard_limit_slack

    @staticmethod
    def order(snapshot: TokenSnapshot) -> tuple[datetime, datetime, str]:
        """The sweep's order: nearest expiry, then oldest, unknowns first, then by realm."""
        return (
            snapshot.refresh_token_expires_at or _NULLS_FIRST,
            snapshot.refresh_token_created_at or _NULLS_FIRST,
            snapshot.realm_id,
        )


def _issued_at_by_intuit(issued: IssuedTokens, now: datetime) -> datetime | None:
    """When Intuit issued the refresh token it just handed back unchanged, by its countdown."""
    remaining = issued.refresh_token_expires_in
    hard = issued.hard_expires_in
    if hard is not None and remaining >= hard - timedelta(minutes=1):
        return None  # the expiry is the five-year limit's, not the token's own: no clue
    return min(now, now + remaining - INTUIT_REFRESH_TOKEN_LIFETIME)


@dataclass(frozen=True)
class RefreshPolicy:
    proactive_age: timedelta = DEFAULT_PROACTIVE_AGE
    background_age: timedelta = DEFAULT_BACKGROUND_AGE
    sweep_interval: timedelta = timedelta(days=7)
    """The longest gap between two sweeps (from the schedule)."""

    @property
    def sweep_horizon(self) -> timedelta:
        return self.sweep_interval + SWEEP_SAFETY_MARGIN

    def sweep_cutoffs(self, now: datetime) -> SweepCutoffs:
        return SweepCutoffs(
            created_by=now - self.background_age, expires_by=now + self.sweep_horizon
        )

    def sweep_due(self, snapshot: TokenSnapshot, now: datetime) -> bool:
        """Does the sweep renew this connection? (See ``SweepCutoffs``.)"""
        return self.sweep_cutoffs(now).due(snapshot)

    def refresh_token_due(self, snapshot: TokenSnapshot, now: datetime, age: timedelta) -> bool:
        created = snapshot.refresh_token_created_at
        # An unknown age (a row imported without one) counts as old: renewing is cheap,
        # letting it lapse is not.
        return created is None or now - created >= age

    @staticmethod
    def may_rotate(snapshot: TokenSnapshot, now: datetime) -> bool:
        """Could refreshing now make Intuit issue a new refresh token (and kill this one)?"""
        created = snapshot.refresh_token_created_at
        return created is None or now - created >= ROTATION_POSSIBLE_AFTER

    @staticmethod
    def loss_cause(snapshot: TokenSnapshot, now: datetime, *, in_doubt: bool) -> LostCause:
        """Why Intuit refused this connection's refresh token (``invalid_grant``).

        ``in_doubt``: a refresh of ours with this very token was sent earlier and its
        answer never stored, so Intuit probably rotated it then.
        """
        if in_doubt:
            return LostCause.LOST_IN_FLIGHT
        deadline = snapshot.reconnect_deadline
        if deadline is not None and now >= deadline:
            return LostCause.HARD_LIMIT
        expires = snapshot.refresh_token_expires_at
        if expires is not None and now >= expires:
            return LostCause.EXPIRED
        return LostCause.REVOKED_AT_INTUIT

    def trigger_on_use(
        self, snapshot: TokenSnapshot, now: datetime, min_validity: timedelta
    ) -> Trigger | None:
        """What, if anything, a GetAccessToken call must refresh before answering."""
        if not snapshot.access_token_valid_for(now, min_validity):
            return Trigger.ACCESS_EXPIRY
        if self.refresh_token_due(snapshot, now, self.proactive_age):
            return Trigger.PROACTIVE
        return None

    def still_needed(
        self,
        trigger: Trigger,
        snapshot: TokenSnapshot,
        now: datetime,
        min_validity: timedelta,
    ) -> bool:
        """Re-checked under the row lock: has someone else already done the work?"""
        if trigger is Trigger.MANUAL:
            return True
        if trigger is Trigger.ACCESS_EXPIRY:
            return not snapshot.access_token_valid_for(now, min_validity)
        if trigger is Trigger.SWEEP:
            return self.sweep_due(snapshot, now)
        return self.refresh_token_due(snapshot, now, self.proactive_age)

    @staticmethod
    def apply(locked: LockedConnection, issued: IssuedTokens, now: datetime) -> TokenUpdate:
        """The columns to write after Intuit answered a refresh of ``locked``."""
        previous = locked.snapshot
        created = previous.refresh_token_created_at
        if issued.refresh_token != locked.refresh_token:
            created = now
        else:
            stated = _issued_at_by_intuit(issued, now)
            if stated is not None and (created is None or abs(created - stated) > _AGE_TOLERANCE):
                created = stated  # the recorded age was wrong (hand-edited, or imported)
        deadline = previous.reconnect_deadline
        if issued.hard_expires_in is not None:
            deadline = now + issued.hard_expires_in
        return TokenUpdate(
            access_token=issued.access_token,
            access_token_expires_at=now + issued.expires_in if issued.access_token else None,
            refresh_token=issued.refresh_token,
            refresh_token_created_at=created,
            refresh_token_expires_at=now + issued.refresh_token_expires_in,
            reconnect_deadline=deadline,
            refreshed_at=now,
        )

    @staticmethod
    def new_grant(issued: IssuedTokens, now: datetime) -> TokenUpdate:
        """The columns a code exchange writes: a refresh token issued just now."""
        return TokenUpdate(
            access_token=issued.access_token,
            access_token_expires_at=now + issued.expires_in if issued.access_token else None,
            refresh_token=issued.refresh_token,
            refresh_token_created_at=now,
            refresh_token_expires_at=now + issued.refresh_token_expires_in,
            reconnect_deadline=now + issued.hard_expires_in if issued.hard_expires_in else None,
            refreshed_at=now,
        )

    @staticmethod
    def from_import(request: ImportRequest) -> TokenUpdate:
        # Unknown issue time stays unknown (and so counts as due): assuming "now"
        # could let a token that is in truth 90 days old lapse unnoticed.
        created = request.refresh_token_created_at
        expires = request.refresh_token_expires_at
        if expires is None and created is not None:
            expires = created + INTUIT_REFRESH_TOKEN_LIFETIME
        return TokenUpdate(
            access_token=request.access_token,
            access_token_expires_at=request.access_token_expires_at,
            refresh_token=request.refresh_token,
            refresh_token_created_at=created,
            refresh_token_expires_at=expires,
            reconnect_deadline=None,
            refreshed_at=None,
        )
