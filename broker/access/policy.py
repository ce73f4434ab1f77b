"""Who may call which method, for which realms: gRPC's authorization policy plus realms.

The format is gRFC A43's JSON (as grpc-go and C-core read it) with one addition,
``realms`` on a rule::

    {
      "name": "qbo-broker",
      "allow_rules": [
        {"name": "billing-reads-tokens",
         "source": {"principals": ["spiffe://corp.example/ns/billing/*"]},
         "request": {"paths": ["/qbo.broker.v1.TokenBrokerService/GetAccessToken"]},
         "realms": ["9130*", "4620816365"]},
        {"name": "oncall-does-everything",
         "source": {"principals": ["spiffe://corp.example/ns/ops/sa/oncall"]}}
      ],
      "deny_rules": [
        {"name": "nobody-touches-the-pilot-realm", "realms": ["4620816365"]}
      ]
    }

- A rule matches a call when any of its principals matches (no ``source``, or no
  principals: every caller, plaintext included) and any of its paths matches (no
  ``request``, or no paths: every method). ``realms`` lists realm ids, prefixes
  ending in one ``*`` (``"9130*"``) or ``"*"``; a rule without it covers every realm.
- A call on a realm is denied if a matching deny rule covers the realm, else allowed if
  a matching allow rule covers it, else denied. Rule order never matters.
- Patterns (principals and paths, case-sensitive): ``"*"`` any non-empty value (RE2's
  ``.+``, so no newline), ``"abc*"`` prefix, ``"*abc"`` suffix, anything else exact (a
  ``*`` in the middle is a literal).
- Principals need TLS: without it no principal pattern matches. With TLS and no client
  certificate patterns see ``""`` (``""`` matches, ``"*"`` does not). With a certificate
  only its URI SANs are tried; if it has none, only its DNS SANs; if none, its RFC 2253
  subject (C-core's ``x509_subject``, the whole DN, not the CN).
- Paths see the raw full method name, ``/package.Service/Method``; a method not of that
  shape is denied whatever the policy.

Deliberate choices, stricter than gRPC:

- Strict principal precedence (grpc-go since #9111, A41): the subject is free text a CA
  rarely constrains, so it must not rescue a certificate whose SANs did not match.
- ``request.headers`` and ``audit_logging_options`` are rejected: half-supporting a
  matcher would let a rule silently mean less than it says.
- ``"deny_rules": []`` is rejected (as C-core does): it is a list someone forgot to fill.
- Duplicate rule names in one list are rejected: gRPC silently keeps only the last one.
- Unknown or duplicate JSON keys, ``null`` values and ``""`` names are rejected, and a
  pattern with ``*`` at both ends (``"*a*"``, ``"**"``) too: grpc-go and C-core read it
  differently and neither has a "contains" match.
- ``"realms": []`` is rejected: "no realm" and "every realm" are both plausible readings.

Paths that cannot match (exact or prefix without a leading ``/``) are accepted, as gRPC
does, and listed in ``Policy.warnings`` for the caller to log. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from broker.domain.model import RealmFilter
from broker.errors import ConfigurationError

_METHOD = re.compile(r"/[^/]+/[^/]+")
_REALM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REALM_MAX = 64
_REALM_CHARS = string.ascii_letters + string.digits + "-_"
_CACHE_SIZE = 4096
_POLICY_FIELDS = {"name", "allow_rules", "deny_rules"}
_RULE_FIELDS = {"name", "source", "request", "realms"}


class PolicyError(ConfigurationError):
    """The authorization policy is malformed; the message says what and where."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as the transport established it."""

    tls: bool
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    subject: str = ""

    @property
    def principal(self) -> str | None:
        """The caller's name for audit lines (not what rules match against)."""
        if self.uri_sans:
            return self.uri_sans[0]
        if self.dns_sans:
            return self.dns_sans[0]
        return self.subject or None

    @classmethod
    def from_auth_context(cls, auth: Mapping[str, Iterable[bytes]]) -> Identity:
        """From ``ServicerContext.auth_context()``: a missing key is an empty list."""

        def texts(key: str) -> tuple[str, ...]:
            return tuple(value.decode("utf-8", "replace") for value in auth.get(key, ()))

        subject = texts("x509_subject")
        return cls(
            tls=any(kind in ("ssl", "tls") for kind in texts("transport_security_type")),
            uri_sans=texts("peer_uri"),
            dns_sans=texts("peer_dns"),
            subject=subject[0] if subject else "",
        )


ANONYMOUS = Identity(tls=False)


@dataclass(frozen=True, slots=True)
class RealmAccess:
    """What one caller may do with one method, realm by realm.

    Prefixes are stored without their ``*``; a realm covered by a deny is never allowed.
    """

    allow_all: bool = False
    allow_exact: frozenset[str] = frozenset()
    allow_prefixes: tuple[str, ...] = ()
    deny_all: bool = False
    deny_exact: frozenset[str] = frozenset()
    deny_prefixes: tuple[str, ...] = ()
    _any: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Asked on every call (may the caller call the method at all): worked out once.
        object.__setattr__(self, "_any", self._allows_some_realm())

    def allows(self, realm_id: str) -> bool:
        return not self._denies(realm_id) and (
            self.allow_all
            or realm_id in self.allow_exact
            or realm_id.startswith(self.allow_prefixes)
        )

    @property
    def any(self) -> bool:
        """Whether some valid realm id is allowed (may the caller call the method at all)."""
        return self._any

    def _allows_some_realm(self) -> bool:
        if self.allow_all:
            return not self._denies_all_from("")
        return any(not self._denies(realm) for realm in self.allow_exact) or any(
            not self._denies_all_from(prefix) for prefix in self.allow_prefixes
        )

    @property
    def everything(self) -> bool:
        """Every realm, with no deny carving any out."""
        return self.allow_all and not (self.deny_all or self.deny_exact or self.deny_prefixes)

    def to_json(self) -> str:
        """This access as JSON (``from_json`` reads it back): kept with a connect link."""
        return json.dumps(
            {
                "allow_all": self.allow_all,
                "allow_exact": sorted(self.allow_exact),
                "allow_prefixes": list(self.allow_prefixes),
                "deny_all": self.deny_all,
                "deny_exact": sorted(self.deny_exact),
                "deny_prefixes": list(self.deny_prefixes),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> RealmAccess:
        """Read ``to_json``'s output; anything else is a ValueError (nothing is allowed)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("realm access must be a JSON object")

        def flag(key: str) -> bool:
            value = data.get(key)
            if not isinstance(value, bool):
                raise ValueError(f"realm access: {key} must be true or false")
            return value

        def texts(key: str) -> tuple[str, ...]:
            value = data.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"realm access: {key} must be a list of strings")
            return tuple(value)

        return cls(
            allow_all=flag("allow_all"),
            allow_exact=frozenset(texts("allow_exact")),
            allow_prefixes=texts("allow_prefixes"),
            deny_all=flag("deny_all"),
            deny_exact=frozenset(texts("deny_exact")),
            deny_prefixes=texts("deny_prefixes"),
        )

    def sql(self) -> RealmFilter:
        return RealmFilter(
            allow_all=self.allow_all,
            allow_exact=tuple(sorted(self.allow_exact)),
            allow_prefixes=tuple(_like(prefix) for prefix in self.allow_prefixes),
            deny_all=self.deny_all,
            deny_exact=tuple(sorted(self.deny_exact)),
            deny_prefixes=tuple(_like(prefix) for prefix in self.deny_prefixes),
        )

    def _denies(self, realm_id: str) -> bool:
        return (
            self.deny_all or realm_id in self.deny_exact or realm_id.startswith(self.deny_prefixes)
        )

    def _denies_all_from(self, prefix: str) -> bool:
        """Whether every valid realm id starting with ``prefix`` ("" or an id) is denied."""
        if self.deny_all or prefix.startswith(self.deny_prefixes):
            return True
        if prefix and prefix not in self.deny_exact:
            return False  # ``prefix`` is itself a realm id, and it is not denied
        if len(prefix) == _REALM_MAX:
            return True
        return all(self._denies_all_from(prefix + char) for char in _REALM_CHARS)


ALLOW_ALL = RealmAccess(allow_all=True)
"""No policy configured: every method, every realm."""
DENY_ALL = RealmAccess(deny_all=True)


def _realm_access(allow: Iterable[str], deny: Iterable[str]) -> RealmAccess:
    allow_all, allow_exact, allow_prefixes = _realm_set(allow)
    deny_all, deny_exact, deny_prefixes = _realm_set(deny)
    if deny_all or not (allow_all or allow_exact or allow_prefixes):
        return DENY_ALL
    return RealmAccess(allow_all, allow_exact, allow_prefixes, deny_all, deny_exact, deny_prefixes)


def _like(prefix: str) -> str:
    """A LIKE pattern (escape character ``\\``, PostgreSQL's default) for ``prefix``."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _realm_set(patterns: Iterable[str]) -> tuple[bool, frozenset[str], tuple[str, ...]]:
    """Validated realm patterns as (all, exact ids, prefixes), without redundant entries."""
    exact: set[str] = set()
    prefixes: set[str] = set()
    for pattern in patterns:
        if pattern == "*":
            return True, frozenset(), ()
        if pattern.endswith("*"):
            prefixes.add(pattern[:-1])
        else:
            exact.add(pattern)
    kept = tuple(sorted(p for p in prefixes if not p.startswith(tuple(prefixes - {p}))))
    return False, frozenset(e for e in exact if not e.startswith(kept)), kept


@dataclass(frozen=True, slots=True)
class _Pattern:
    kind: Literal["exact", "prefix", "suffix", "present"]
    text: str

    def matches(self, value: str) -> bool:
        if self.kind == "exact":
            return value == self.text
        if self.kind == "prefix":
            return value.startswith(self.text)
        if self.kind == "suffix":
            return value.endswith(self.text)
        return value != "" and "\n" not in value  # RE2 full match of ".+"


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    principals: tuple[_Pattern, ...]  # empty: any caller
    paths: tuple[_Pattern, ...]  # empty: any method
    realms: tuple[str, ...]

    def matches(self, identity: Identity, method: str) -> bool:
        if self.paths and not any(path.matches(method) for path in self.paths):
            return False
        if not self.principals:
            return True
        if not identity.tls:
            return False
        # Strict precedence: only the first kind of name the certificate carries.
        names = identity.uri_sans or identity.dns_sans or (identity.subject,)
        return any(p.matches(name) for p in self.principals for name in names)


class Policy:
    """A parsed policy; ``access`` answers (and remembers) what a caller may do."""

    def __init__(
        self,
        name: str,
        allow_rules: tuple[_Rule, ...],
        deny_rules: tuple[_Rule, ...],
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.warnings = warnings
        self._allow = allow_rules
        self._deny = deny_rules
        self._cached_access = functools.lru_cache(maxsize=_CACHE_SIZE)(self._access)

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, {len(self._allow)} allow, {len(self._deny)} deny rules)"

    @classmethod
    def parse(cls, text: str) -> Policy:
        """The policy in ``text`` (JSON), or ``PolicyError`` saying what is wrong and where."""
        return _Parser().policy(text)

    def access(self, identity: Identity, method: str) -> RealmAccess:
        if not _METHOD.fullmatch(method):
            return DENY_ALL
        return self._cached_access(identity, method)

    def _access(self, identity: Identity, method: str) -> RealmAccess:
        def realms(rules: tuple[_Rule, ...]) -> list[str]:
            return [realm for r in rules if r.matches(identity, method) for realm in r.realms]

        return _realm_access(allow=realms(self._allow), deny=realms(self._deny))


# --- parsing -----------------------------------------------------------------------------


class _Object(dict[str, object]):
    """A JSON object that remembers the keys it saw twice."""

    duplicates: tuple[str, ...] = ()


def _object_from_pairs(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        keys = [key for key, _ in pairs]
        obj.duplicates = tuple(sorted({key for key in keys if keys.count(key) > 1}))
    return obj


def _no_constant(name: str) -> NoReturn:
    raise PolicyError(f"the policy is not valid JSON: {name} is not a JSON value")


class _Parser:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def policy(self, text: str) -> Policy:
        try:
            top = json.loads(
                text, object_pairs_hook=_object_from_pairs, parse_constant=_no_constant
            )
        except json.JSONDecodeError as exc:
            raise PolicyError(f"the policy is not valid JSON: {exc}") from None
        except RecursionError:
            raise PolicyError("the policy JSON is nested too deeply") from None
        obj = _object(top, "the policy", "")
        if "audit_logging_options" in obj:
            raise PolicyError(
                "'audit_logging_options' is not supported by this broker "
                "(gRFC A59 audit loggers are not implemented): remove it"
            )
        _known(obj, "the policy", "", _POLICY_FIELDS)
        name = _name(obj, "")
        allow = self.rules(obj, "allow_rules", required=True)
        deny = self.rules(obj, "deny_rules", required=False)
        return Policy(name, allow, deny, tuple(self.warnings))

    def rules(self, obj: _Object, key: str, *, required: bool) -> tuple[_Rule, ...]:
        if key not in obj:
            if required:
                raise PolicyError(f"'{key}' is missing")
            return ()
        items = _list(obj[key], key, "")
        if not items:
            hint = "" if required else " (omit it when there are no deny rules)"
            raise PolicyError(f"'{key}' is empty{hint}")
        seen: dict[str, int] = {}
        rules = []
        for index, item in enumerate(items):
            rule = self.rule(item, f"{key} {index}")
            if rule.name in seen:
                raise PolicyError(
                    f"{key} {index} (name {rule.name!r}): the rule name is already used by "
                    f"{key} {seen[rule.name]}"
                )
            seen[rule.name] = index
            rules.append(rule)
        return tuple(rules)

    def rule(self, item: object, at: str) -> _Rule:
        if not isinstance(item, _Object):
            raise PolicyError(f"{at} is not an object")
        obj = _object(item, "the rule", f"{at}: ")
        name = _name(obj, f"{at}: ")
        where = f"{at} (name {name!r}): "
        _known(obj, "the rule", where, _RULE_FIELDS)
        principals: tuple[_Pattern, ...] = ()
        paths: tuple[_Pattern, ...] = ()
        if "source" in obj:
            source = _known(
                _object(obj["source"], "'source'", where), "'source'", where, {"principals"}
            )
            principals = _patterns(source, "principals", where)
        if "request" in obj:
            request = _object(obj["request"], "'request'", where)
            if "headers" in request:
                raise PolicyError(
                    f"{where}'headers' in 'request' is not supported by this broker "
                    "(it authorizes on principals, paths and realms only): remove it"
                )
            paths = _patterns(_known(request, "'request'", where, {"paths"}), "paths", where)
            for index, path in enumerate(paths):
                if path.kind in ("exact", "prefix") and not path.text.startswith("/"):
                    self.warnings.append(
                        f"{where}'paths' {index} {_text(path)!r} does not start with '/' "
                        "and can never match a method ('/package.Service/Method')"
                    )
        return _Rule(name, principals, paths, _realms(obj, where))


def _object(value: object, what: str, where: str) -> _Object:
    if not isinstance(value, _Object):
        raise PolicyError(f"{where}{what} is not an object")
    if value.duplicates:
        raise PolicyError(f"{where}duplicate key {value.duplicates[0]!r} in {what}")
    return value


def _known(obj: _Object, what: str, where: str, known: set[str]) -> _Object:
    for key in obj:
        if key not in known:
            raise PolicyError(f"{where}unknown field {key!r} in {what}")
    return obj


def _list(value: object, key: str, where: str) -> list[object]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}'{key}' is not a list")
    return value


def _name(obj: _Object, where: str) -> str:
    if "name" not in obj:
        raise PolicyError(f"{where}'name' is missing")
    name = obj["name"]
    if not isinstance(name, str):
        raise PolicyError(f"{where}'name' is not a string")
    if not name:
        raise PolicyError(f"{where}'name' is empty")
    return name


def _strings(obj: _Object, key: str, where: str) -> list[str]:
    items = _list(obj[key], key, where)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise PolicyError(f"{where}'{key}' {index} is not a string")
    return [str(item) for item in items]


def _patterns(obj: _Object, key: str, where: str) -> tuple[_Pattern, ...]:
    if key not in obj:
        return ()
    patterns = []
    for index, text in enumerate(_strings(obj, key, where)):
        if text == "*":
            patterns.append(_Pattern("present", ""))
        elif len(text) > 1 and text.startswith("*") and text.endswith("*"):
            raise PolicyError(
                f"{where}'{key}' {index} {text!r} has a '*' at both ends: gRPC implementations "
                "read that differently and none has a 'contains' match"
            )
        elif text.endswith("*"):
            patterns.append(_Pattern("prefix", text[:-1]))
        elif text.startswith("*"):
            patterns.append(_Pattern("suffix", text[1:]))
        else:
            patterns.append(_Pattern("exact", text))
    return tuple(patterns)


def _text(pattern: _Pattern) -> str:
    return pattern.text + "*" if pattern.kind == "prefix" else pattern.text


def _realms(obj: _Object, where: str) -> tuple[str, ...]:
    if "realms" not in obj:
        return ("*",)
    realms = _strings(obj, "realms", where)
    if not realms:
        raise PolicyError(f"{where}'realms' is empty (omit it to cover every realm)")
    for index, realm in enumerate(realms):
        if realm != "*" and not _REALM_ID.fullmatch(realm.removesuffix("*")):
            raise PolicyError(
                f"{where}'realms' {index} {realm!r} is not a realm id (1 to 64 letters, digits, "
                "'-' and '_'), a realm id prefix ending in one '*', or '*'"
            )
    return tuple(realms)
