"""The authorization policy: gRFC A43's format and matching, plus realms (broker.access.policy).

Cases marked "A43 7.n" are ported from the reference tests listed in section 7 of
the gRPC authorization notes; those that need header matching are left out
because this broker rejects ``request.headers``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.access.policy import (
    ALLOW_ALL,
    ANONYMOUS,
    DENY_ALL,
    Identity,
    Policy,
    PolicyError,
    RealmAccess,
)
from broker.domain.model import RealmFilter
from broker.errors import ConfigurationError

T = "/grpc.testing.TestService"
UNARY = f"{T}/UnaryCall"
STREAMING_OUTPUT = f"{T}/StreamingOutputCall"
STREAMING_INPUT = f"{T}/StreamingInputCall"
GET_TOKEN = "/qbo.broker.v1.TokenBrokerService/GetAccessToken"

PLAINTEXT = ANONYMOUS
SERVER_ONLY_TLS = Identity(tls=True)  # TLS, but the client sent no certificate
ADMIN = "spiffe://cluster.local/ns/default/sa/admin"

Json = dict[str, Any]


def mtls(*, uri: tuple[str, ...] = (), dns: tuple[str, ...] = (), subject: str = "") -> Identity:
    return Identity(tls=True, uri_sans=uri, dns_sans=dns, subject=subject)


CLIENT_CERT = mtls(uri=("spiffe://corp.example/app",), subject="CN=app")


def make(allow: list[Json], deny: list[Json] | None = None, name: str = "test") -> Policy:
    document: Json = {"name": name, "allow_rules": allow}
    if deny is not None:
        document["deny_rules"] = deny
    return Policy.parse(json.dumps(document))


def access(policy: Policy, identity: Identity = PLAINTEXT, method: str = UNARY) -> RealmAccess:
    return policy.access(identity, method)


def allowed(
    policy: Policy, identity: Identity = PLAINTEXT, method: str = UNARY, realm: str = "123"
) -> bool:
    return policy.access(identity, method).allows(realm)


def among(got: RealmAccess, *realms: str) -> set[str]:
    """Which of these realms ``got`` allows."""
    return {realm for realm in realms if got.allows(realm)}


def rule(name: str = "r", **fields: Any) -> Json:
    return {"name": name, **fields}


def principals(*patterns: str) -> Json:
    return {"principals": list(patterns)}


def paths(*patterns: str) -> Json:
    return {"paths": list(patterns)}


# --- decisions (A43 7.2-7.6) -------------------------------------------------------------


def test_a_deny_rule_wins_over_an_allow_rule() -> None:  # A43 7.2
    policy = make([rule("all", request=paths("*"))], [rule("none", request=paths("*"))])
    assert not allowed(policy)
    assert access(policy) == DENY_ALL


def test_a_rule_with_only_a_name_allows_every_caller_and_method() -> None:  # from A43 7.3
    policy = make([rule("anyone")])
    for identity in (PLAINTEXT, SERVER_ONLY_TLS, CLIENT_CERT):
        for method in (UNARY, STREAMING_OUTPUT, GET_TOKEN):
            assert allowed(policy, identity, method)


def test_a_principal_never_matches_a_plaintext_caller() -> None:  # A43 7.4
    policy = make(
        [rule("user", source=principals("some_user"))],
        [rule("no-output", request=paths(STREAMING_OUTPUT))],
    )
    assert not allowed(policy, PLAINTEXT, UNARY)


def test_a_listed_method_is_allowed_and_an_unlisted_one_denied() -> None:  # A43 7.5
    two = make([rule("two", request=paths(UNARY, STREAMING_INPUT))])
    assert allowed(two, method=UNARY)
    assert allowed(two, method=STREAMING_INPUT)
    one = make([rule("one", request=paths(STREAMING_OUTPUT))])
    assert not allowed(one, method=UNARY)
    assert access(one, method=UNARY) == DENY_ALL


def test_without_a_matching_allow_rule_a_call_is_denied() -> None:
    policy = make([rule("admin", source=principals(ADMIN))])
    assert not allowed(policy, CLIENT_CERT)
    assert not access(policy, CLIENT_CERT).any


def test_an_empty_source_and_empty_lists_match_every_caller_even_plaintext() -> None:
    policy = make([rule("open", source={"principals": []}, request={"paths": []})])
    assert allowed(policy, PLAINTEXT)
    assert make([rule("open", source={}, request={})]).access(PLAINTEXT, UNARY).everything


def test_a_deny_rule_for_another_caller_does_not_deny() -> None:
    policy = make([rule("all")], [rule("not-admin", source=principals(ADMIN))])
    assert allowed(policy, CLIENT_CERT)
    assert not allowed(policy, mtls(uri=(ADMIN,)))


# --- principals (A43 7.6, 7.8-7.11) ------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "expected"),
    [(PLAINTEXT, False), (SERVER_ONLY_TLS, True), (CLIENT_CERT, True)],
    ids=["plaintext", "tls-without-client-cert", "mtls"],
)
def test_star_needs_a_name_and_the_empty_principal_matches_tls_without_a_certificate(
    identity: Identity, expected: bool
) -> None:  # A43 7.6
    policy = make([rule("any-tls", source=principals("*", ""))])
    assert allowed(policy, identity) is expected


def test_star_alone_does_not_match_tls_without_a_client_certificate() -> None:
    assert not allowed(make([rule("star", source=principals("*"))]), SERVER_ONLY_TLS)


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (mtls(uri=(ADMIN,)), True),
        (mtls(subject="CN=localhost"), False),
        (PLAINTEXT, False),
    ],
    ids=["uri-san", "subject-only", "no-tls"],
)
def test_an_exact_uri_principal_matches_only_that_uri_san(
    identity: Identity, expected: bool
) -> None:  # A43 7.8
    assert allowed(make([rule("admin", source=principals(ADMIN))]), identity) is expected


@pytest.mark.parametrize(
    ("identity", "expected"),
    [(mtls(uri=(ADMIN,)), False), (SERVER_ONLY_TLS, True), (PLAINTEXT, False)],
    ids=["cert-with-uri-san", "tls-without-client-cert", "plaintext"],
)
def test_the_empty_principal_matches_only_tls_without_a_client_certificate(
    identity: Identity, expected: bool
) -> None:  # A43 7.9
    assert allowed(make([rule("no-cert", source=principals(""))]), identity) is expected


def test_uri_sans_alone_are_tried_when_the_certificate_has_any() -> None:  # A43 7.10
    legitimate = "svc.legitimate.internal"
    policy = make([rule("legit", source=principals(legitimate))])
    cert = mtls(uri=("spiffe://corp.example/svc/other",), dns=(legitimate,), subject=legitimate)
    assert not allowed(policy, cert)


def test_dns_sans_alone_are_tried_when_the_certificate_has_no_uri_san() -> None:  # A43 7.10
    policy = make([rule("legit", source=principals("*svc.legitimate.internal"))])
    cert = mtls(dns=("svc.other.internal",), subject="CN=svc.legitimate.internal")
    assert not allowed(policy, cert)
    assert allowed(policy, mtls(dns=("x.svc.other.internal", "svc.legitimate.internal")))


def test_the_subject_is_tried_when_the_certificate_has_no_san() -> None:  # A43 7.10
    policy = make([rule("legit", source=principals("*svc.legitimate.internal"))])
    assert allowed(policy, mtls(subject="CN=svc.legitimate.internal"))


def test_a_deny_on_dns_names_does_not_fire_for_a_certificate_with_uri_sans() -> None:
    policy = make([rule("all")], [rule("no-evil", source=principals("evil.example"))])
    assert not allowed(policy, mtls(dns=("evil.example",)))
    assert allowed(policy, mtls(uri=("spiffe://corp.example/app",), dns=("evil.example",)))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("CN=def,OU=Google", False), ("CN=abc,OU=Google", True), ("abc", False)],
)
def test_the_subject_is_matched_as_the_whole_distinguished_name(
    pattern: str, expected: bool
) -> None:  # A43 7.11
    policy = make([rule("dn", source=principals(pattern))])
    assert allowed(policy, mtls(subject="CN=abc,OU=Google")) is expected


def test_principals_are_case_sensitive() -> None:
    policy = make([rule("admin", source=principals(ADMIN))])
    assert not allowed(policy, mtls(uri=(ADMIN.upper(),)))


def test_principal_prefix_and_suffix_patterns() -> None:
    policy = make([rule("ns", source=principals("spiffe://cluster.local/ns/default/*", "*.ops"))])
    assert allowed(policy, mtls(uri=(ADMIN,)))
    assert allowed(policy, mtls(dns=("oncall.ops",)))
    assert not allowed(policy, mtls(uri=("spiffe://cluster.local/ns/other/sa/admin",)))


def test_a_star_in_the_middle_of_a_principal_is_a_literal() -> None:  # A43 7.12
    policy = make([rule("literal", source=principals("spiffe://abc.*.com"))])
    assert allowed(policy, mtls(uri=("spiffe://abc.*.com",)))
    assert not allowed(policy, mtls(uri=("spiffe://abc.xyz.com",)))


def test_star_does_not_match_a_name_with_a_newline_as_in_re2() -> None:
    policy = make([rule("star", source=principals("*"))])
    assert not allowed(policy, mtls(subject="CN=a\nb"))


# --- paths -------------------------------------------------------------------------------


def test_a_path_prefix_is_a_plain_string_prefix() -> None:
    policy = make([rule("svc", request=paths("/pkg.Sv*"))])
    assert allowed(policy, method="/pkg.Svc/M")
    assert allowed(policy, method="/pkg.Svc2/M")
    assert not allowed(policy, method="/pkg.Other/M")


def test_a_path_suffix_matches_and_is_not_warned_about() -> None:
    policy = make([rule("secret", request=paths("*/secret"))])
    assert allowed(policy, method="/pkg.Svc/secret")
    assert not allowed(policy, method="/pkg.Svc/public")
    assert policy.warnings == ()


def test_a_star_in_the_middle_of_a_path_is_a_literal() -> None:
    policy = make([rule("literal", request=paths("/pkg.Svc/A*B"))])
    assert allowed(policy, method="/pkg.Svc/A*B")
    assert not allowed(policy, method="/pkg.Svc/AxB")


def test_a_path_without_a_leading_slash_is_accepted_with_a_warning_and_never_matches() -> None:
    policy = make([rule("slashless", request=paths("pkg.Svc/M", "pkg.Svc/*", "*"))])
    assert len(policy.warnings) == 2
    assert "allow_rules 0 (name 'slashless'): 'paths' 0 'pkg.Svc/M'" in policy.warnings[0]
    assert "'paths' 1 'pkg.Svc/*' does not start with '/'" in policy.warnings[1]
    only_slashless = make([rule("slashless", request=paths("pkg.Svc/M", "pkg.Svc/*"))])
    assert not allowed(only_slashless, method="/pkg.Svc/M")


@pytest.mark.parametrize("method", ["pkg.Svc/M", "", "/", "//Svc/M", "/Svc/M/", "/Svc//M", "/Svc"])
def test_a_method_not_shaped_like_a_grpc_path_is_denied_whatever_the_policy(method: str) -> None:
    policy = make([rule("anything")])
    assert policy.access(CLIENT_CERT, method) == DENY_ALL
    assert not policy.access(CLIENT_CERT, method).any


# --- realms ------------------------------------------------------------------------------


def test_a_rule_without_realms_covers_every_realm() -> None:
    got = access(make([rule("all")]))
    assert among(got, "1", "9130354674") == {"1", "9130354674"}
    assert (got.any, got.everything) == (True, True)


def test_an_exact_realm_allows_only_that_realm() -> None:
    got = access(make([rule("one", realms=["123"])]))
    assert among(got, "123", "1234", "12") == {"123"}
    assert (got.any, got.everything) == (True, False)


def test_a_realm_prefix_allows_every_realm_starting_with_it() -> None:
    got = access(make([rule("fleet", realms=["9130*"])]))
    assert among(got, "9130", "9130354674", "913", "19130") == {"9130", "9130354674"}
    assert (got.any, got.everything) == (True, False)


def test_a_star_realm_allows_every_realm() -> None:
    got = access(make([rule("all", realms=["42", "*"])]))
    assert got.allows("1")
    assert (got.any, got.everything) == (True, True)


def test_the_realms_of_every_matching_allow_rule_add_up() -> None:
    policy = make(
        [
            rule("a", realms=["1"]),
            rule("b", realms=["2*"]),
            rule("other-method", request=paths(GET_TOKEN), realms=["3"]),
        ]
    )
    got = access(policy)
    assert among(got, "1", "20", "3") == {"1", "20"}


def test_a_deny_rule_with_realms_carves_them_out_of_an_allow_all_rule() -> None:
    got = access(make([rule("all")], [rule("pilot", realms=["9130*", "42"])]))
    assert among(got, "1", "913", "9130", "9130354674", "42") == {"1", "913"}
    assert (got.any, got.everything) == (True, False)


def test_a_deny_rule_without_realms_wins_over_everything() -> None:
    policy = make([rule("all"), rule("some", realms=["1"])], [rule("nobody", request=paths(UNARY))])
    got = access(policy)
    assert got == DENY_ALL
    assert not got.allows("1")
    assert (got.any, got.everything) == (False, False)
    assert access(policy, method=STREAMING_OUTPUT).everything


def test_any_is_false_when_the_denies_cover_every_allowed_realm() -> None:
    exact = access(make([rule("one", realms=["42"])], [rule("not", realms=["42"])]))
    assert not exact.any
    assert not exact.allows("42")
    prefix = access(make([rule("91", realms=["91*"])], [rule("9", realms=["9*"])]))
    assert not prefix.any
    every_char = [
        c + "*" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
    ]
    covered = access(make([rule("all")], [rule("each-first-char", realms=every_char)]))
    assert not covered.any


def test_any_is_true_when_a_realm_under_an_allowed_prefix_escapes_the_denies() -> None:
    got = access(make([rule("91", realms=["91*"])], [rule("not-91", realms=["91", "910*"])]))
    assert got.any
    assert among(got, "911", "91", "9105") == {"911"}


def test_any_and_everything_of_the_constants() -> None:
    assert (ALLOW_ALL.any, ALLOW_ALL.everything, ALLOW_ALL.allows("1")) == (True, True, True)
    assert (DENY_ALL.any, DENY_ALL.everything, DENY_ALL.allows("1")) == (False, False, False)


def test_the_sql_filter_lists_exact_ids_and_like_prefixes() -> None:
    got = access(
        make([rule("some", realms=["12", "9130_*", "a*"])], [rule("not", realms=["a1", "a2*"])])
    )
    assert got.sql() == RealmFilter(
        allow_all=False,
        allow_exact=("12",),
        allow_prefixes=("9130\\_%", "a%"),
        deny_all=False,
        deny_exact=("a1",),
        deny_prefixes=("a2%",),
    )


def test_the_sql_filter_of_allow_all_and_deny_all() -> None:
    assert ALLOW_ALL.sql() == RealmFilter(True, (), (), False, (), ())
    assert DENY_ALL.sql().deny_all
    everything = access(make([rule("all", realms=["*", "12", "3*"])]))
    assert everything.sql() == RealmFilter(True, (), (), False, (), ())


def test_realm_patterns_covered_by_a_shorter_prefix_are_dropped() -> None:
    got = access(make([rule("nines", realms=["91*", "9*", "95", "8"])]))
    assert got.sql().allow_prefixes == ("9%",)
    assert got.sql().allow_exact == ("8",)


# --- identities --------------------------------------------------------------------------


def test_plaintext_has_an_empty_auth_context_and_is_anonymous() -> None:
    identity = Identity.from_auth_context({})
    assert identity == ANONYMOUS
    assert not identity.tls
    assert identity.principal is None


@pytest.mark.parametrize("kind", [b"ssl", b"tls"])
def test_tls_without_a_client_certificate_has_no_names(kind: bytes) -> None:
    identity = Identity.from_auth_context({"transport_security_type": [kind]})
    assert identity == SERVER_ONLY_TLS
    assert identity.principal is None


def test_tls_with_a_certificate_reads_uri_and_dns_sans_and_the_subject() -> None:
    identity = Identity.from_auth_context(
        {
            "transport_security_type": [b"ssl"],
            "peer_uri": [ADMIN.encode(), b"spiffe://cluster.local/other"],
            "peer_dns": [b"admin.internal"],
            "x509_subject": [b"CN=admin,O=Corp"],
            "x509_common_name": [b"admin"],
        }
    )
    assert identity == Identity(
        tls=True,
        uri_sans=(ADMIN, "spiffe://cluster.local/other"),
        dns_sans=("admin.internal",),
        subject="CN=admin,O=Corp",
    )
    assert identity.principal == ADMIN


def test_another_transport_is_not_tls() -> None:
    identity = Identity.from_auth_context({"transport_security_type": [b"alts"]})
    assert not identity.tls


def test_the_principal_is_the_first_uri_san_else_dns_san_else_subject() -> None:
    assert mtls(uri=("u1", "u2"), dns=("d1",), subject="CN=s").principal == "u1"
    assert mtls(dns=("d1", "d2"), subject="CN=s").principal == "d1"
    assert mtls(subject="CN=s").principal == "CN=s"
    assert mtls().principal is None


# --- the policy object -------------------------------------------------------------------


def test_a_parsed_policy_keeps_its_name_and_has_no_warnings() -> None:
    policy = make([rule("all")], name="qbo-broker")
    assert policy.name == "qbo-broker"
    assert policy.warnings == ()


def test_access_is_remembered_per_identity_and_method() -> None:
    policy = make([rule("fleet", realms=["9*"])])
    first = policy.access(mtls(uri=(ADMIN,)), UNARY)
    assert policy.access(mtls(uri=(ADMIN,)), UNARY) is first
    assert policy.access(mtls(uri=(ADMIN,)), GET_TOKEN) is not first


def test_the_same_rule_name_may_be_used_once_in_each_list() -> None:
    policy = make([rule("x")], [rule("x", realms=["1"])])
    assert not allowed(policy, realm="1")
    assert allowed(policy, realm="2")


def test_a_policy_error_is_a_configuration_error() -> None:
    assert issubclass(PolicyError, ConfigurationError)


# --- load-time rejections (A43 7.12 and ours) ---------------------------------------------

OK_RULE = '{"name": "r"}'


def policy_text(rule_text: str = OK_RULE, extra: str = "") -> str:
    return f'{{"name": "p", "allow_rules": [{rule_text}]{extra}}}'


REJECTED: list[tuple[str, str, str]] = [
    # A43 7.12
    ("empty-object", "{}", "'name' is missing"),
    ("name-not-string", '{"name": 123}', "'name' is not a string"),
    ("unknown-field", '{"random": 123}', "unknown field 'random' in the policy"),
    ("no-allow-rules", '{"name": "n"}', "'allow_rules' is missing"),
    ("empty-allow-rules", '{"name": "n", "allow_rules": []}', "'allow_rules' is empty"),
    ("rule-without-name", policy_text("{}"), "allow_rules 0: 'name' is missing"),
    (
        "principal-not-string",
        policy_text('{"name": "ops", "source": {"principals": ["*", 123]}}'),
        "allow_rules 0 (name 'ops'): 'principals' 1 is not a string",
    ),
    (
        "source-not-object",
        policy_text('{"name": "r", "source": 111}'),
        "allow_rules 0 (name 'r'): 'source' is not an object",
    ),
    # JSON itself
    ("not-json", '{"name": "p",', "the policy is not valid JSON"),
    ("trailing-data", policy_text() + " {}", "the policy is not valid JSON: Extra data"),
    ("nan", policy_text(extra=', "x": NaN'), "NaN is not a JSON value"),
    ("array", "[]", "the policy is not an object"),
    ("duplicate-key", '{"name": "a", "name": "b", "allow_rules": []}', "duplicate key 'name'"),
    (
        "duplicate-key-in-source",
        policy_text('{"name": "r", "source": {"principals": [], "principals": ["x"]}}'),
        "allow_rules 0 (name 'r'): duplicate key 'principals' in 'source'",
    ),
    (
        "duplicate-key-in-rule",
        policy_text('{"name": "r", "realms": ["1"], "realms": ["*"]}'),
        "allow_rules 0: duplicate key 'realms' in the rule",
    ),
    # names
    ("empty-name", '{"name": "", "allow_rules": [{"name": "r"}]}', "'name' is empty"),
    ("null-name", '{"name": null, "allow_rules": [{"name": "r"}]}', "'name' is not a string"),
    ("rule-name-empty", policy_text('{"name": ""}'), "allow_rules 0: 'name' is empty"),
    ("rule-name-number", policy_text('{"name": 7}'), "allow_rules 0: 'name' is not a string"),
    (
        "duplicate-rule-name",
        policy_text('{"name": "ops"}, {"name": "ro"}, {"name": "ops"}'),
        "allow_rules 2 (name 'ops'): the rule name is already used by allow_rules 0",
    ),
    ("capitalised-key", '{"Name": "p", "allow_rules": []}', "unknown field 'Name' in the policy"),
    # structure and types
    ("allow-rules-null", '{"name": "p", "allow_rules": null}', "'allow_rules' is not a list"),
    ("allow-rules-object", '{"name": "p", "allow_rules": {}}', "'allow_rules' is not a list"),
    ("empty-deny-rules", policy_text(extra=', "deny_rules": []'), "'deny_rules' is empty"),
    ("null-deny-rules", policy_text(extra=', "deny_rules": null'), "'deny_rules' is not a list"),
    ("rule-not-object", policy_text('"r"'), "allow_rules 0 is not an object"),
    (
        "deny-rule-not-object",
        policy_text(extra=', "deny_rules": [{"name": "d"}, null]'),
        "deny_rules 1 is not an object",
    ),
    (
        "unknown-field-in-rule",
        policy_text('{"name": "r", "sources": {}}'),
        "allow_rules 0 (name 'r'): unknown field 'sources' in the rule",
    ),
    (
        "unknown-field-in-source",
        policy_text('{"name": "r", "source": {"principal": []}}'),
        "allow_rules 0 (name 'r'): unknown field 'principal' in 'source'",
    ),
    (
        "unknown-field-in-request",
        policy_text('{"name": "r", "request": {"path": []}}'),
        "allow_rules 0 (name 'r'): unknown field 'path' in 'request'",
    ),
    ("null-source", policy_text('{"name": "r", "source": null}'), "'source' is not an object"),
    ("null-request", policy_text('{"name": "r", "request": null}'), "'request' is not an object"),
    (
        "principals-null",
        policy_text('{"name": "r", "source": {"principals": null}}'),
        "'principals' is not a list",
    ),
    (
        "principals-string",
        policy_text('{"name": "r", "source": {"principals": "x"}}'),
        "'principals' is not a list",
    ),
    (
        "paths-null-entry",
        policy_text('{"name": "r", "request": {"paths": ["/a/b", null]}}'),
        "allow_rules 0 (name 'r'): 'paths' 1 is not a string",
    ),
    # ambiguous patterns
    (
        "star-both-ends-principal",
        policy_text('{"name": "r", "source": {"principals": ["*a*"]}}'),
        "'principals' 0 '*a*' has a '*' at both ends",
    ),
    (
        "double-star-path",
        policy_text('{"name": "r", "request": {"paths": ["/a/b", "**"]}}'),
        "'paths' 1 '**' has a '*' at both ends",
    ),
    # unsupported
    (
        "headers",
        policy_text('{"name": "r", "request": {"headers": [{"key": "k", "values": ["v"]}]}}'),
        "allow_rules 0 (name 'r'): 'headers' in 'request' is not supported by this broker",
    ),
    (
        "empty-headers",
        policy_text('{"name": "r", "request": {"paths": [], "headers": []}}'),
        "'headers' in 'request' is not supported",
    ),
    (
        "audit-logging",
        policy_text(extra=', "audit_logging_options": {"audit_condition": "NONE"}'),
        "'audit_logging_options' is not supported by this broker",
    ),
    # realms
    ("realms-null", policy_text('{"name": "r", "realms": null}'), "'realms' is not a list"),
    ("realms-empty", policy_text('{"name": "r", "realms": []}'), "'realms' is empty"),
    (
        "realm-not-string",
        policy_text('{"name": "r", "realms": ["1", 2]}'),
        "allow_rules 0 (name 'r'): 'realms' 1 is not a string",
    ),
]

HEADER_CASES = [  # A43 7.12's header rejections: every header matcher is refused
    '{"headers": [{}]}',
    '{"headers": [{"key": "k"}]}',
    '{"headers": [{"key": ":method", "values": ["GET"]}]}',
    '{"headers": [{"key": "grpc-xxx", "values": ["v"]}]}',
    '{"headers": [{"key": "Host", "values": ["v"]}]}',
    '{"headers": [{"key": "k", "values": []}]}',
]

BAD_REALMS = ["", "ab*c", "**", "*abc", "a b", "9130**", "x" * 65, "é", "12%"]


@pytest.mark.parametrize(
    ("text", "message"),
    [(text, message) for _, text, message in REJECTED],
    ids=[r[0] for r in REJECTED],
)
def test_a_malformed_policy_is_rejected_with_a_message_naming_the_problem(
    text: str, message: str
) -> None:
    with pytest.raises(PolicyError) as raised:
        Policy.parse(text)
    assert message in str(raised.value)


@pytest.mark.parametrize("request_text", HEADER_CASES)
def test_any_header_matcher_is_rejected_as_unsupported(request_text: str) -> None:
    text = policy_text(f'{{"name": "h", "request": {request_text}}}')
    with pytest.raises(PolicyError, match="'headers' in 'request' is not supported"):
        Policy.parse(text)


@pytest.mark.parametrize("realm", BAD_REALMS)
def test_a_malformed_realm_pattern_is_rejected(realm: str) -> None:
    text = policy_text(json.dumps(rule("r", realms=["1", realm])))
    with pytest.raises(PolicyError) as raised:
        Policy.parse(text)
    assert f"allow_rules 0 (name 'r'): 'realms' 1 {realm!r} is not a realm id" in str(raised.value)


@pytest.mark.parametrize("realm", ["*", "1", "x" * 64, "a-b_C9", "9130*", "x" * 64 + "*"])
def test_a_well_formed_realm_pattern_is_accepted(realm: str) -> None:
    assert Policy.parse(policy_text(json.dumps(rule("r", realms=[realm])))).name == "p"
