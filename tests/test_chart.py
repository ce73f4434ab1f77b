"""The Helm chart (helm/qbo-token-broker), rendered and linted by the real Helm library.

helm-python-sdk embeds Helm's Go SDK, so these tests load, lint and render the chart the
way ``helm lint`` and ``helm template`` do, and check ``values.schema.json`` as ``helm
install`` does; no cluster and no helm binary are involved. Every rendered manifest is
validated offline (``kubernetes-validate``, strict: unknown fields are errors) against the
oldest Kubernetes the chart supports and the newest the validator knows. The custom
resources (ServiceMonitor, PrometheusRule, Certificate) have no schema there: their shape
is checked by hand below.

Two renders are the baseline: (a) the defaults plus the minimum (the names of the three
existing Secrets) and (b) ``tests/chart-values/production.yaml``. Manifests are parsed
with Helm's own YAML reader (the sigs.k8s.io/yaml that kubectl uses), so what is checked
here is what the API server would read.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

try:
    import helm_python as helm  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - the dev extra pins it
    pytest.skip(
        "helm-python-sdk is not installed: the chart cannot be rendered "
        "(pyproject's dev extra must pin helm-python-sdk)",
        allow_module_level=True,
    )
try:
    import kubernetes_validate  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - the dev extra pins it
    pytest.skip(
        "kubernetes-validate is not installed: rendered manifests cannot be validated "
        "(pyproject's dev extra must pin kubernetes-validate)",
        allow_module_level=True,
    )

from broker.access.policy import Policy
from broker.settings import VARIABLES, Settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "qbo-token-broker"
FILES = CHART / "files"
PRODUCTION = ROOT / "tests" / "chart-values" / "production.yaml"
RELEASE = "qbo-token-broker"
NAMESPACE = "qbo"
FULLNAME = RELEASE  # the release name contains the chart name
PUBLISHED_RUNBOOK = "https://github.com/qbo-token-broker/qbo-token-broker/blob/main/docs/runbook.md"

MINIMUM: dict[str, Any] = helm.values_from_yaml(
    (ROOT / "tests" / "chart-values" / "minimal.yaml").read_text()
)
"""The defaults plus the minimum to render: the names of the existing Secrets."""

OLDEST_KUBERNETES = "1.27"  # Chart.yaml: kubeVersion >=1.27.0-0
NEWEST_KUBERNETES = ".".join(str(kubernetes_validate.latest_version()).split(".")[:2])
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
WRITABLE = "/tmp"  # noqa: S108 - the emptyDir the read-only root filesystem leaves writable
SECRET_VARIABLES = ("BROKER_DATABASE_URL", "BROKER_ENCRYPTION_KEYS", "QB_CLIENT_SECRET")

DEFAULT_OBJECTS = [
    ("ConfigMap", FULLNAME),
    ("ConfigMap", f"{FULLNAME}-policy"),
    ("Deployment", FULLNAME),
    ("NetworkPolicy", FULLNAME),
    ("PodDisruptionBudget", FULLNAME),
    ("Service", FULLNAME),
    ("ServiceAccount", FULLNAME),
]
PRODUCTION_OBJECTS = sorted(
    [
        *DEFAULT_OBJECTS,
        ("Certificate", f"{FULLNAME}-server"),
        ("Certificate", f"{FULLNAME}-client-billing-api"),
        ("Certificate", f"{FULLNAME}-client-onboarding"),
        ("ConfigMap", f"{FULLNAME}-dashboard"),
        ("HorizontalPodAutoscaler", FULLNAME),
        ("Ingress", FULLNAME),
        ("PrometheusRule", FULLNAME),
        ("ServiceMonitor", FULLNAME),
    ]
)
"""docs/deploy.md's table of rendered objects lists these."""


# -- rendering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    manifests: list[dict[str, Any]]
    notes: str

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def broker(self) -> dict[str, Any]:
        return container(self.pod["containers"], "broker")

    @property
    def config(self) -> dict[str, str]:
        data: dict[str, str] = self.one("ConfigMap", FULLNAME)["data"]
        return data

    def objects(self) -> list[tuple[str, str]]:
        return sorted((m["kind"], m["metadata"]["name"]) for m in self.manifests)


def container(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers if c["name"] == name]
    return found


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def documents(text: str) -> Iterator[dict[str, Any]]:
    """The YAML documents of one rendered template, as the API server would read them."""
    for chunk in re.split(r"(?m)^---[ \t]*$", text):
        document = helm.values_from_yaml(chunk) if chunk.strip() else {}
        if document:
            yield document


def render(values: dict[str, Any]) -> Rendered:
    with helm.Chart.load(CHART) as chart:
        output = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    notes = ""
    manifests: list[dict[str, Any]] = []
    for path, text in sorted(output.items()):
        if path.endswith("NOTES.txt"):
            notes = text
        elif path.endswith((".yaml", ".yml")):
            manifests.extend(documents(text))
    return Rendered(manifests, notes)


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    return " ".join(str(caught.value).split())


def production_values() -> dict[str, Any]:
    return helm.values_from_yaml(PRODUCTION.read_text())


def with_minimum(**override: Any) -> dict[str, Any]:
    return merge(MINIMUM, override)


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render(MINIMUM)


@pytest.fixture(scope="module")
def production() -> Rendered:
    return render(production_values())


BASELINES: dict[str, Callable[[], dict[str, Any]]] = {
    "default": lambda: MINIMUM,
    "production": production_values,
}


@pytest.fixture(scope="module", params=sorted(BASELINES))
def baseline(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Rendered]:
    values = BASELINES[request.param]()
    return values, render(values)


# -- the chart as a package -----------------------------------------------------------------


def test_chart_metadata_matches_the_package() -> None:
    with helm.Chart.load(CHART) as chart:
        metadata = chart.metadata
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    assert metadata["apiVersion"] == "v2"
    assert metadata["name"] == "qbo-token-broker"
    assert metadata["kubeVersion"] == ">=1.27.0-0"
    assert metadata["appVersion"] == project["version"], (
        "Chart.yaml appVersion must be pyproject.toml's version: the image tag defaults to it"
    )


@pytest.mark.parametrize("kubernetes", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_helm_lint_is_clean(baseline: tuple[dict[str, Any], Rendered], kubernetes: str) -> None:
    values, _ = baseline
    report = helm.lint(
        CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kubernetes}.0"
    )

    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


def test_every_manifest_is_valid_kubernetes(baseline: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = baseline
    checked = 0
    for manifest in rendered.manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_RESOURCES:
            continue  # no schema in kubernetes-validate: see the *_shape tests
        for version in (OLDEST_KUBERNETES, NEWEST_KUBERNETES):
            kubernetes_validate.validate(manifest, version, strict=True)
        checked += 1
    assert checked >= len(DEFAULT_OBJECTS)


def test_the_objects_rendered(default: Rendered, production: Rendered) -> None:
    assert default.objects() == sorted(DEFAULT_OBJECTS)
    assert production.objects() == PRODUCTION_OBJECTS


def test_every_object_carries_the_standard_labels(
    baseline: tuple[dict[str, Any], Rendered],
) -> None:
    _, rendered = baseline
    for manifest in rendered.manifests:
        labels = manifest["metadata"]["labels"]
        for label in STANDARD_LABELS:
            assert labels.get(label), f"{manifest['kind']} lacks {label}"
        assert labels["app.kubernetes.io/name"] == "qbo-token-broker"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.3.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "qbo-token-broker-0.3.0"
    template = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert all(template.get(label) for label in STANDARD_LABELS)
    assert selector.items() <= template.items()
    assert rendered.one("Service")["spec"]["selector"] == selector


# -- the pod ----------------------------------------------------------------------------------


def test_the_pod_runs_locked_down(baseline: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = baseline
    pod = rendered.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert rendered.one("ServiceAccount")["automountServiceAccountToken"] is False
    for each in [*pod["initContainers"], *pod["containers"]]:
        context = each["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == 10001
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        # The read-only root leaves /tmp, an emptyDir, as the one writable place.
        tmp = next(m for m in each["volumeMounts"] if m["name"] == "tmp")
        assert tmp["mountPath"] == WRITABLE
        assert tmp.get("readOnly") is not True
    (tmp_volume,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp_volume


def test_probes_use_the_plaintext_http_port(baseline: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = baseline
    broker = rendered.broker
    ports = {port["name"]: port["containerPort"] for port in broker["ports"]}
    assert ports == {"grpc": 50051, "http": 8080}
    assert broker["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert broker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert broker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert rendered.config["BROKER_GRPC_ADDR"] == "0.0.0.0:50051"
    assert rendered.config["BROKER_HTTP_ADDR"] == "0.0.0.0:8080"
    assert broker["args"] == ["serve"]


def test_the_service_names_its_ports(baseline: tuple[dict[str, Any], Rendered]) -> None:
    _, rendered = baseline
    ports = {port["name"]: port for port in rendered.one("Service")["spec"]["ports"]}
    assert set(ports) == {"grpc", "http"}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["grpc"]["targetPort"] == "grpc"
    assert ports["http"]["targetPort"] == "http"


def test_rolling_updates_always_keep_a_ready_pod(
    baseline: tuple[dict[str, Any], Rendered],
) -> None:
    _, rendered = baseline
    spec = rendered.one("Deployment")["spec"]
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pdb = rendered.one("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"] == spec["selector"]
    spread = {c["topologyKey"]: c for c in rendered.pod["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread.values():
        assert constraint["labelSelector"] == spec["selector"]


def test_spread_is_soft_by_default_and_replicas_two(
    default: Rendered, production: Rendered
) -> None:
    assert default.one("Deployment")["spec"]["replicas"] == 2
    for constraint in default.pod["topologySpreadConstraints"]:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
    for constraint in production.pod["topologySpreadConstraints"]:
        assert constraint["whenUnsatisfiable"] == "DoNotSchedule"
    # With the HorizontalPodAutoscaler, it owns the replica count.
    assert "replicas" not in production.one("Deployment")["spec"]
    hpa = production.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 8)
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


def test_migrations_run_first_with_the_same_environment(
    baseline: tuple[dict[str, Any], Rendered],
) -> None:
    _, rendered = baseline
    (migrate,) = rendered.pod["initContainers"]
    broker = rendered.broker
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == broker["image"]
    for field in ("env", "envFrom", "volumeMounts"):
        assert migrate[field] == broker[field], field


# -- shutdown ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intuit_timeout", "grace", "expected"),
    [
        (None, None, 25),  # defaults: 10 s → budget 15 → + 5, + the 5 s preStop sleep
        (5, 9, 25),  # the 15 s floor
        (25, 27, 40),  # budget 30
        (30, 32, 45),  # the most Intuit may take: budget 35
    ],
)
def test_termination_grace_is_the_shutdown_budget_plus_five_plus_the_prestop_sleep(
    intuit_timeout: int | None, grace: int | None, expected: int
) -> None:
    config: dict[str, Any] = {}
    if intuit_timeout is not None:
        config = {"intuitTimeoutSeconds": intuit_timeout, "shutdownGraceSeconds": grace}
    rendered = render(with_minimum(config=config))

    assert rendered.pod["terminationGracePeriodSeconds"] == expected
    # The broker's own arithmetic (broker/settings.py) agrees with the template's.
    timeout = int(rendered.config["QB_HTTP_TIMEOUT_SECONDS"])
    budget = Settings(intuit_timeout=timedelta(seconds=timeout)).shutdown_budget.total_seconds()
    assert expected == budget + 5 + 5
    assert rendered.broker["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


def test_a_prestop_sleep_is_added_to_the_grace(production: Rendered) -> None:
    # production.yaml: Intuit timeout 20 → budget 25, + 5, + a 5 s preStop sleep.
    assert production.pod["terminationGracePeriodSeconds"] == 35
    assert production.broker["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


def test_a_grace_that_does_not_fit_the_budget_fails_the_render() -> None:
    render(with_minimum(config={"shutdownGraceSeconds": 12}))  # 15 - 3: fits

    message = render_error(with_minimum(config={"shutdownGraceSeconds": 13}))

    assert "config.shutdownGraceSeconds (BROKER_SHUTDOWN_GRACE_SECONDS) is 13" in message
    assert "must be at most 12" in message
    assert "max(15, config.intuitTimeoutSeconds + 5) = 15 s" in message


# -- access control ---------------------------------------------------------------------------


def test_mutual_tls_and_the_policy_are_on_by_default(default: Rendered) -> None:
    config = default.config
    assert config["BROKER_INSECURE"] == "false"
    assert config["BROKER_TLS_CERT_FILE"] == "/etc/qbo-broker/tls/tls.crt"
    assert config["BROKER_TLS_KEY_FILE"] == "/etc/qbo-broker/tls/tls.key"
    assert config["BROKER_TLS_CLIENT_CA_FILE"] == "/etc/qbo-broker/tls/ca.crt"
    assert config["BROKER_AUTHZ_POLICY_FILE"] == "/etc/qbo-broker/policy/policy.json"
    volumes = {v["name"]: v for v in default.pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == f"{FULLNAME}-tls"
    assert {item["key"] for item in volumes["tls"]["secret"]["items"]} == {
        "tls.crt",
        "tls.key",
        "ca.crt",
    }
    assert volumes["policy"]["configMap"]["name"] == f"{FULLNAME}-policy"
    assert "gRPC health checks only" in default.notes


def test_certificates_and_the_policy_are_reloaded_not_restarted(
    baseline: tuple[dict[str, Any], Rendered],
) -> None:
    """Mounted as directories (a subPath never sees updates); only the env ConfigMap rolls pods."""
    _, rendered = baseline
    for mount in rendered.broker["volumeMounts"]:
        assert "subPath" not in mount, mount
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert set(annotations) == {"checksum/config", "kubectl.kubernetes.io/default-container"}


def test_the_policy_renders_as_json_the_broker_accepts(
    baseline: tuple[dict[str, Any], Rendered],
) -> None:
    values, rendered = baseline
    text = rendered.one("ConfigMap", f"{FULLNAME}-policy")["data"]["policy.json"]

    policy = Policy.parse(text)

    expected = merge(render_defaults(), values)["authz"]["policy"]
    assert json.loads(text) == expected
    assert policy.name == expected["name"]


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"tls": {"enabled": False}}, "tls.enabled is false but insecure is false"),
        ({"authz": {"policy": None}}, "authz.policy is empty but insecure is false"),
    ],
)
def test_insecure_false_without_tls_or_policy_fails_the_render(
    override: dict[str, Any], words: str
) -> None:
    message = render_error(with_minimum(**override))

    assert words in message
    assert "insecure: true" in message


def test_insecure_must_be_explicit_and_is_warned(default: Rendered) -> None:
    rendered = render(with_minimum(insecure=True, tls={"enabled": False}))

    assert rendered.config["BROKER_INSECURE"] == "true"
    assert not any(key.startswith("BROKER_TLS_") for key in rendered.config)
    assert "BROKER_AUTHZ_POLICY_FILE" not in rendered.config
    assert {v["name"] for v in rendered.pod["volumes"]} == {"tmp"}
    assert "WARNING: insecure is true" in rendered.notes
    assert "WARNING: insecure" not in default.notes


def test_cert_manager_certificates_shape(production: Rendered) -> None:
    certificates = {c["metadata"]["name"]: c for c in production.all("Certificate")}
    for certificate in certificates.values():
        assert certificate["apiVersion"] == "cert-manager.io/v1"
        assert certificate["spec"]["issuerRef"] == {
            "name": "platform-mtls-ca",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        }
        assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Always"

    server = certificates[f"{FULLNAME}-server"]
    assert server["metadata"]["namespace"] == NAMESPACE
    mounted = next(v for v in production.pod["volumes"] if v["name"] == "tls")
    assert server["spec"]["secretName"] == mounted["secret"]["secretName"]
    assert f"{FULLNAME}.{NAMESPACE}.svc" in server["spec"]["dnsNames"]
    assert "qbo-broker.internal.example.com" in server["spec"]["dnsNames"]
    assert "server auth" in server["spec"]["usages"]

    billing = certificates[f"{FULLNAME}-client-billing-api"]
    assert billing["metadata"]["namespace"] == "billing"
    assert billing["spec"]["uris"] == ["spiffe://cluster.local/ns/billing/sa/api"]
    assert billing["spec"]["secretName"] == f"{FULLNAME}-client-billing-api"
    assert "client auth" in billing["spec"]["usages"]
    onboarding = certificates[f"{FULLNAME}-client-onboarding"]
    assert onboarding["spec"]["secretName"] == "qbo-broker-client"


def test_a_client_certificate_elsewhere_needs_a_cluster_issuer() -> None:
    values = production_values()
    values["certManager"]["issuerRef"]["kind"] = "Issuer"

    message = render_error(values)

    assert "an Issuer signs only in its own namespace: use a ClusterIssuer" in message


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_value_or_key_material_in_the_default_render(default: Rendered) -> None:
    assert default.all("Secret") == []
    text = json.dumps(default.manifests)
    for marker in ("BEGIN", "PRIVATE KEY", "postgresql://", "postgres://", "stringData"):
        assert marker not in text
    for variable in SECRET_VARIABLES:
        assert variable not in default.config
    for each in [*default.pod["initContainers"], *default.pod["containers"]]:
        env = {entry["name"]: entry for entry in each["env"]}
        assert set(env) == set(SECRET_VARIABLES)
        for entry in env.values():
            assert "value" not in entry
            assert set(entry["valueFrom"]) == {"secretKeyRef"}
    refs = {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in default.broker["env"]}
    assert refs["BROKER_DATABASE_URL"] == {
        "name": "qbo-broker-database",
        "key": "BROKER_DATABASE_URL",
    }
    assert refs["BROKER_ENCRYPTION_KEYS"]["name"] == "qbo-broker-keys"
    assert refs["QB_CLIENT_SECRET"]["name"] == "qbo-broker-intuit"


def test_existing_secret_keys_come_from_values(production: Rendered) -> None:
    refs = {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in production.broker["env"]}
    assert refs["BROKER_DATABASE_URL"] == {"name": "qbo-broker-database", "key": "url"}
    assert refs["BROKER_ENCRYPTION_KEYS"] == {"name": "qbo-broker-keys", "key": "keys"}
    assert refs["QB_CLIENT_SECRET"] == {"name": "qbo-broker-intuit", "key": "client-secret"}


def test_the_secret_names_are_required() -> None:
    message = render_error({})

    assert "secrets.clientSecret.name is empty" in message
    assert "docs/deploy.md#secrets" in message


def test_secrets_never_go_into_the_config_map() -> None:
    message = render_error(with_minimum(config={"extraEnv": {"QB_CLIENT_SECRET": "x"}}))

    assert "secret values never go into the ConfigMap" in message


def test_the_development_secret_is_opt_in_and_warned() -> None:
    rendered = render(
        {
            "createSecret": {
                "enabled": True,
                "databaseUrl": "postgresql://broker:pw@db:5432/qbo",
                "encryptionKeys": "k1:" + "A" * 43 + "=",
                "clientSecret": "intuit-secret",
            }
        }
    )

    (secret,) = rendered.all("Secret")
    assert set(secret["data"]) == set(SECRET_VARIABLES)
    assert "WARNING: createSecret.enabled is true (development only)" in rendered.notes
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in rendered.broker["env"]}
    assert set(refs.values()) == {secret["metadata"]["name"]}
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/dev-secrets" in annotations


def test_notes_warn_about_missing_secrets(default: Rendered) -> None:
    # Rendered offline, `lookup` finds nothing: every Secret is reported as not found.
    for name in ("qbo-broker-database", "qbo-broker-keys", "qbo-broker-intuit", "-tls"):
        assert re.search(rf"WARNING: .*Secret \S*{re.escape(name)}", default.notes), name
    assert "config.clientId (QB_CLIENT_ID) is empty" in default.notes


# -- configuration ----------------------------------------------------------------------------


def test_the_config_map_holds_only_the_brokers_variables(
    baseline: tuple[dict[str, Any], Rendered], tmp_path: Path
) -> None:
    _, rendered = baseline
    known = {variable.name for variable in VARIABLES}
    assert set(rendered.config) <= known - set(SECRET_VARIABLES)
    assert rendered.config["BROKER_LOG_FORMAT"] == "json"
    assert rendered.config["BROKER_TOKEN_CACHE_SIZE"].isdigit()

    # The broker reads this environment as the pod would give it (files mapped into tmp_path).
    env = dict(rendered.config)
    for name, value in env.items():
        if value.startswith("/etc/qbo-broker/"):
            env[name] = str(tmp_path / Path(value).name)
            Path(env[name]).write_text("{}")
    env |= {
        "BROKER_DATABASE_URL": "postgresql://broker@db.example.com:5432/qbo",
        "BROKER_ENCRYPTION_KEYS": "k1:" + "A" * 43 + "=",
        "QB_CLIENT_SECRET": "secret",
    }
    settings = Settings.from_env(env)
    assert settings.access_controlled
    assert rendered.pod["terminationGracePeriodSeconds"] >= (
        settings.shutdown_budget.total_seconds() + 5
    )


def test_config_values_reach_the_environment(production: Rendered) -> None:
    config = production.config
    assert config["QB_CLIENT_ID"] == "ABcd1234efGH5678ijKL"
    assert config["QB_ENVIRONMENT"] == "production"
    assert config["QB_REDIRECT_URI"] == "https://qbo-broker.example.com/oauth/callback"
    assert config["BROKER_CONNECT_RETURN_URLS"] == "https://app.example.com/quickbooks/"
    assert config["BROKER_TOKEN_CACHE_SIZE"] == "200000"
    assert config["BROKER_DB_POOL_SIZE"] == "12"
    assert config["BROKER_SHUTDOWN_GRACE_SECONDS"] == "20"


def test_big_numbers_are_not_printed_in_exponent_form() -> None:
    rendered = render(with_minimum(cacheSize=2_000_000, config={"databaseWaitSeconds": 3600}))

    assert rendered.config["BROKER_TOKEN_CACHE_SIZE"] == "2000000"
    assert rendered.config["BROKER_DATABASE_WAIT_SECONDS"] == "3600"


@pytest.mark.parametrize(
    ("cache_size", "memory"),
    [
        (100_000, "576Mi"),  # (128 + 351.6) x 1.2
        (10_000, "196Mi"),  # (128 + 35.2) x 1.2
        (200_000, "998Mi"),  # (128 + 703.1) x 1.2
        (1_000_000, "4373Mi"),  # (128 + 3515.6) x 1.2
    ],
)
def test_memory_is_sized_from_the_cache(cache_size: int, memory: str) -> None:
    resources = render(with_minimum(cacheSize=cache_size)).broker["resources"]

    assert resources["requests"]["memory"] == memory
    assert resources["limits"]["memory"] == memory
    assert "cpu" not in resources["limits"]


def test_explicit_resources_win() -> None:
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}

    rendered = render(with_minimum(resources=resources))

    assert rendered.broker["resources"] == resources


def test_the_database_ca_is_mounted_for_sslrootcert(production: Rendered) -> None:
    volume = next(v for v in production.pod["volumes"] if v["name"] == "database-ca")
    assert volume["configMap"]["name"] == "rds-ca-bundle"
    mount = next(m for m in production.broker["volumeMounts"] if m["name"] == "database-ca")
    assert mount["mountPath"] == "/etc/qbo-broker/database-ca"
    assert mount["readOnly"] is True


def test_too_many_database_sessions_fail_the_render() -> None:
    # 3 pods during a rollout x (10 + 2) + 1 = 37 sessions.
    render(with_minimum(database={"maxConnections": 37}))

    message = render_error(with_minimum(database={"maxConnections": 36}))

    assert "may open 37 PostgreSQL sessions" in message


# -- network ----------------------------------------------------------------------------------


def test_the_ingress_exposes_only_oauth(production: Rendered) -> None:
    spec = production.one("Ingress")["spec"]

    (rule,) = spec["rules"]
    assert rule["host"] == "qbo-broker.example.com"  # config.redirectUri's host
    (path,) = rule["http"]["paths"]
    assert path == {
        "path": "/oauth/",
        "pathType": "Prefix",
        "backend": {"service": {"name": FULLNAME, "port": {"name": "http"}}},
    }
    assert spec["tls"] == [
        {"hosts": ["qbo-broker.example.com"], "secretName": "qbo-broker-public-tls"}
    ]
    assert spec["ingressClassName"] == "nginx"


def test_the_network_policy(production: Rendered) -> None:
    spec = production.one("NetworkPolicy")["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["podSelector"] == production.one("Deployment")["spec"]["selector"]

    by_port: dict[str, list[dict[str, Any]]] = {}
    for rule in spec["ingress"]:
        (port,) = rule["ports"]
        by_port.setdefault(port["port"], []).extend(rule["from"])
    assert by_port["grpc"] == [
        {"namespaceSelector": {"matchLabels": {"qbo-token-broker/client": "true"}}}
    ]
    http_namespaces = [peer["namespaceSelector"]["matchLabels"] for peer in by_port["http"]]
    assert http_namespaces == [
        {"kubernetes.io/metadata.name": "monitoring"},
        {"kubernetes.io/metadata.name": "ingress-nginx"},
    ]

    database, dns, intuit = spec["egress"]
    assert database == {
        "ports": [{"port": 5432, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.20.30.0/24"}}],
    }
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert intuit["ports"] == [{"port": 443, "protocol": "TCP"}]
    block = intuit["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(block["except"])


# -- monitoring -------------------------------------------------------------------------------


def test_the_service_monitor_scrapes_metrics_as_the_alerts_expect(production: Rendered) -> None:
    monitor = production.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= (
        production.one("Service")["metadata"]["labels"].items()
    )
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # The rules select job="qbo-token-broker" (QboBrokerDown).
    rules_text = (FILES / "prometheus-rules.yaml").read_text()
    assert 'job="qbo-token-broker"' in rules_text
    assert {"action": "replace", "targetLabel": "job", "replacement": "qbo-token-broker"} in (
        endpoint["relabelings"]
    )


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = helm.values_from_yaml(
        (FILES / "prometheus-rules.yaml").read_text()
    )["groups"]
    return groups


def test_the_prometheus_rule_wraps_the_rule_file_unchanged() -> None:
    rendered = render(with_minimum(prometheusRule={"enabled": True}))

    rule = rendered.one("PrometheusRule")

    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == rule_groups()


def test_the_runbook_base_url_is_replaceable(production: Rendered) -> None:
    groups = production.one("PrometheusRule")["spec"]["groups"]
    base = "https://wiki.example.com/runbooks/qbo-token-broker"

    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert alerts
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == f"{base}#{alert['alert'].lower()}"
    # Everything else is the file's.
    text = json.dumps(groups).replace(base, PUBLISHED_RUNBOOK)
    assert json.loads(text) == rule_groups()


def test_the_dashboard_config_map(production: Rendered) -> None:
    dashboard = production.one("ConfigMap", f"{FULLNAME}-dashboard")

    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Integrations"}
    (content,) = dashboard["data"].values()
    committed = json.loads((FILES / "dashboards" / "qbo-token-broker.json").read_text())
    assert json.loads(content) == committed


# -- the schema -------------------------------------------------------------------------------


def test_the_schema_rejects_an_unknown_top_level_key() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(MINIMUM)
        with pytest.raises(helm.HelmValuesError, match="replicas"):
            chart.validate_schema(with_minimum(replicas=3))  # the key is replicaCount
    assert "replicas" in render_error(with_minimum(replicas=3))


@pytest.mark.parametrize(
    "override",
    [
        {"config": {"intuitTimout": 10}},  # a typo below the top level
        {"cacheSize": "lots"},
        {"config": {"intuitTimeoutSeconds": 31}},  # broker/settings.py: at most 30
        {"config": {"redirectUri": "https://broker.example.com/callback"}},
        {"tls": {"enabled": "yes"}},
        {"certManager": {"clients": [{"name": "billing"}]}},  # no uri
        # An unquoted realm id is a number to YAML, and the broker reads strings only.
        {"authz": {"policy": {"name": "p", "allow_rules": [{"name": "r", "realms": [913035]}]}}},
        {"authz": {"policy": {"name": "p", "allow_rules": [{"name": "r", "realm": ["1"]}]}}},
    ],
)
def test_the_schema_rejects_bad_values(override: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(with_minimum(**override))


def render_defaults() -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.values
