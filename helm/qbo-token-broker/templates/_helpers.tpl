{{/*
Names, labels, the shutdown arithmetic and the checks that stop a bad render.
*/}}

{{- define "qbo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "qbo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "qbo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The version that runs: the image tag, else the chart's appVersion. */}}
{{- define "qbo.version" -}}
{{- default .Chart.AppVersion .Values.image.tag | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "qbo.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "qbo.version" .) -}}
{{- end -}}
{{- end -}}

{{/*
The standard labels. Call with (dict "ctx" $ "component" "broker").
*/}}
{{- define "qbo.labels" -}}
helm.sh/chart: {{ include "qbo.chart" .ctx }}
app.kubernetes.io/name: {{ include "qbo.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ include "qbo.version" .ctx | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: {{ .ctx.Values.partOf | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{- define "qbo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qbo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "qbo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "qbo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "qbo.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "qbo.fullname" .)) .Values.tls.secretName -}}
{{- end -}}

{{- define "qbo.devSecretName" -}}
{{- printf "%s-dev-secrets" (include "qbo.fullname" .) -}}
{{- end -}}

{{/* A policy is mounted (and required) only with mutual TLS: in plaintext no principal matches. */}}
{{- define "qbo.policyEnabled" -}}
{{- if and .Values.tls.enabled (not (empty .Values.authz.policy)) -}}true{{- end -}}
{{- end -}}

{{/*
The shutdown budget, as broker/settings.py computes it: max(15, QB_HTTP_TIMEOUT_SECONDS + 5).
*/}}
{{- define "qbo.shutdownBudget" -}}
{{- max 15 (add (int .Values.config.intuitTimeoutSeconds) 5) -}}
{{- end -}}

{{/* Kubernetes must wait longer than the broker: budget + 5 s, plus any preStop sleep. */}}
{{- define "qbo.terminationGracePeriod" -}}
{{- add (include "qbo.shutdownBudget" . | int) 5 (int .Values.preStopSleepSeconds) -}}
{{- end -}}

{{/*
Memory per replica: ceil((processMiB + cacheSize × perConnectionKiB / 1024) × (1 + headroom/100)).
*/}}
{{- define "qbo.memoryMiB" -}}
{{- $m := .Values.memory -}}
{{- $cache := divf (mulf (float64 .Values.cacheSize) (float64 $m.perConnectionKiB)) 1024.0 -}}
{{- $raw := mulf (addf (float64 $m.processMiB) $cache) (addf 1.0 (divf (float64 $m.headroomPercent) 100.0)) -}}
{{- ceil $raw | int64 -}}
{{- end -}}

{{- define "qbo.resources" -}}
{{- if .Values.resources -}}
{{- toYaml .Values.resources -}}
{{- else -}}
{{- $memory := printf "%sMi" (include "qbo.memoryMiB" .) -}}
requests:
  cpu: {{ .Values.cpu.request | quote }}
  memory: {{ $memory }}
limits:
  memory: {{ $memory }}
{{- end -}}
{{- end -}}

{{/* The most replicas that can run at once: the rollout's surge included. */}}
{{- define "qbo.maxReplicas" -}}
{{- if .Values.autoscaling.enabled -}}
{{- add (int .Values.autoscaling.maxReplicas) 1 -}}
{{- else -}}
{{- add (int .Values.replicaCount) 1 -}}
{{- end -}}
{{- end -}}

{{/* PostgreSQL sessions the broker may hold at once: pool + change feed + sweep lock per replica, + a migrate. */}}
{{- define "qbo.databaseSessions" -}}
{{- add (mul (include "qbo.maxReplicas" . | int) (add (int .Values.config.dbPoolSize) 2)) 1 -}}
{{- end -}}

{{- define "qbo.ingressHost" -}}
{{- if .Values.ingress.host -}}
{{- .Values.ingress.host -}}
{{- else if .Values.config.redirectUri -}}
{{- (urlParse .Values.config.redirectUri).hostname -}}
{{- end -}}
{{- end -}}

{{/*
Every check that must stop a render, with a message that says what to change.
*/}}
{{- define "qbo.validate" -}}
{{- $budget := include "qbo.shutdownBudget" . | int -}}
{{- $grace := int .Values.config.shutdownGraceSeconds -}}
{{- if gt $grace (sub $budget 3) -}}
{{- fail (printf "config.shutdownGraceSeconds (BROKER_SHUTDOWN_GRACE_SECONDS) is %d, but it must be at most %d: the shutdown budget is max(15, config.intuitTimeoutSeconds + 5) = %d s and the grace must leave 3 s of it for refreshes already sent to Intuit to be stored (the broker refuses to start otherwise)" $grace (sub $budget 3) $budget) -}}
{{- end -}}
{{- if not .Values.insecure -}}
{{- if not .Values.tls.enabled -}}
{{- fail "tls.enabled is false but insecure is false: off loopback the broker requires mutual TLS and an authorization policy. Enable tls (see docs/deploy.md#certificates), or set insecure: true to serve every caller in plaintext (never in production)" -}}
{{- end -}}
{{- if empty .Values.authz.policy -}}
{{- fail "authz.policy is empty but insecure is false: off loopback the broker requires an authorization policy (docs/access.md#the-policy) with mutual TLS. Write authz.policy, or set insecure: true to serve every caller in plaintext (never in production)" -}}
{{- end -}}
{{- end -}}
{{- if include "qbo.policyEnabled" . -}}
{{- if not (kindIs "map" .Values.authz.policy) -}}
{{- fail "authz.policy must be an object: {name, allow_rules, deny_rules} (docs/access.md#the-policy)" -}}
{{- end -}}
{{- if empty .Values.authz.policy.name -}}
{{- fail "authz.policy.name is empty: the broker refuses a policy without a name" -}}
{{- end -}}
{{- if empty .Values.authz.policy.allow_rules -}}
{{- fail "authz.policy.allow_rules is empty: the broker refuses a policy without allow rules (docs/access.md#the-policy)" -}}
{{- end -}}
{{- end -}}
{{- if not .Values.createSecret.enabled -}}
{{- range $field, $variable := dict "databaseUrl" "BROKER_DATABASE_URL" "encryptionKeys" "BROKER_ENCRYPTION_KEYS" "clientSecret" "QB_CLIENT_SECRET" -}}
{{- if empty (index $.Values.secrets $field).name -}}
{{- fail (printf "secrets.%s.name is empty: name the existing Secret that holds %s (under key secrets.%s.key); docs/deploy.md#secrets shows the kubectl command" $field $variable $field) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $name, $value := .Values.config.extraEnv -}}
{{- if has $name (list "BROKER_DATABASE_URL" "BROKER_ENCRYPTION_KEYS" "QB_CLIENT_SECRET") -}}
{{- fail (printf "config.extraEnv.%s: secret values never go into the ConfigMap; use secrets.* (an existing Secret)" $name) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.database.ca.configMap .Values.database.ca.secret -}}
{{- fail "database.ca: set configMap or secret, not both" -}}
{{- end -}}
{{- if .Values.certManager.enabled -}}
{{- if not .Values.tls.enabled -}}
{{- fail "certManager.enabled needs tls.enabled: the certificates are for mutual TLS" -}}
{{- end -}}
{{- if empty .Values.certManager.issuerRef.name -}}
{{- fail "certManager.issuerRef.name is empty: name the cert-manager Issuer or ClusterIssuer that signs the broker's and its callers' certificates" -}}
{{- end -}}
{{- range .Values.certManager.clients -}}
{{- if and .namespace (ne .namespace $.Release.Namespace) (eq $.Values.certManager.issuerRef.kind "Issuer") -}}
{{- fail (printf "certManager.clients %s: namespace %s differs from the release's (%s), and an Issuer signs only in its own namespace: use a ClusterIssuer (certManager.issuerRef.kind)" .name .namespace $.Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingress.enabled (empty (include "qbo.ingressHost" .)) -}}
{{- fail "ingress.enabled needs a host: set ingress.host, or config.redirectUri (its host is used)" -}}
{{- end -}}
{{- $maxConnections := int .Values.database.maxConnections -}}
{{- if gt $maxConnections 0 -}}
{{- $sessions := include "qbo.databaseSessions" . | int -}}
{{- if gt $sessions $maxConnections -}}
{{- fail (printf "the broker may open %d PostgreSQL sessions ((%s replicas during a rollout) × (config.dbPoolSize %d + 2) + 1 migrate), more than database.maxConnections (%d): lower config.dbPoolSize or the replicas, or raise max_connections" $sessions (include "qbo.maxReplicas" .) (int .Values.config.dbPoolSize) $maxConnections) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The broker's environment, shared by the migrate initContainer and the broker: the ConfigMap
(envFrom) and the three secret variables from their Secrets.
*/}}
{{- define "qbo.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "qbo.fullname" . }}
env:
{{- if .Values.createSecret.enabled }}
  {{- range $variable := list "BROKER_DATABASE_URL" "BROKER_ENCRYPTION_KEYS" "QB_CLIENT_SECRET" }}
  - name: {{ $variable }}
    valueFrom:
      secretKeyRef:
        name: {{ include "qbo.devSecretName" $ }}
        key: {{ $variable }}
  {{- end }}
{{- else }}
  {{- range $field, $variable := dict "databaseUrl" "BROKER_DATABASE_URL" "encryptionKeys" "BROKER_ENCRYPTION_KEYS" "clientSecret" "QB_CLIENT_SECRET" }}
  {{- $ref := index $.Values.secrets $field }}
  - name: {{ $variable }}
    valueFrom:
      secretKeyRef:
        name: {{ $ref.name }}
        key: {{ $ref.key }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "qbo.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/qbo-broker/tls
  readOnly: true
{{- end }}
{{- if include "qbo.policyEnabled" . }}
- name: policy
  mountPath: /etc/qbo-broker/policy
  readOnly: true
{{- end }}
{{- if or .Values.database.ca.configMap .Values.database.ca.secret }}
- name: database-ca
  mountPath: /etc/qbo-broker/database-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "qbo.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
