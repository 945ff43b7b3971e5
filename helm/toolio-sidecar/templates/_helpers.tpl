{{/*
Names and labels.
*/}}
{{- define "toolio-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "toolio-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "toolio-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "toolio-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "toolio-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "toolio-sidecar.labels" -}}
helm.sh/chart: {{ include "toolio-sidecar.chart" . }}
{{ include "toolio-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: toolio
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "toolio-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "toolio-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "toolio-sidecar.adminServiceName" -}}
{{- printf "%s-admin" (include "toolio-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "toolio-sidecar.dataClaimName" -}}
{{- default (printf "%s-data" (include "toolio-sidecar.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}; the digest wins over the tag.
Call with (dict "image" .Values.image "defaultTag" .Chart.AppVersion).
*/}}
{{- define "toolio-sidecar.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (toString (.image.tag | default .defaultTag)) }}
{{- end }}
{{- end }}

{{/*
Fixed paths inside the container. data_dir is the only persistent writable path; it is
also the image's VOLUME.
*/}}
{{- define "toolio-sidecar.dataDir" -}}/data{{- end }}
{{- define "toolio-sidecar.configDir" -}}/etc/toolio-sidecar{{- end }}
{{- define "toolio-sidecar.signingDir" -}}/run/secrets/toolio-sidecar/signing{{- end }}

{{/*
Where the sidecar forwards requests.
*/}}
{{- define "toolio-sidecar.upstreamURL" -}}
{{- if eq .Values.mode "sidecar" }}
{{- printf "http://127.0.0.1:%d" (int .Values.mcpServer.port) }}
{{- else }}
{{- .Values.upstream.url }}
{{- end }}
{{- end }}

{{/*
TCP port of upstream.url (for the upstream NetworkPolicy).
*/}}
{{- define "toolio-sidecar.upstreamPort" -}}
{{- if .Values.networkPolicy.upstream.port }}
{{- int .Values.networkPolicy.upstream.port }}
{{- else }}
{{- $url := urlParse .Values.upstream.url }}
{{- if regexMatch ":[0-9]+$" $url.host }}
{{- regexFind "[0-9]+$" $url.host }}
{{- else if eq $url.scheme "https" }}443
{{- else }}80
{{- end }}
{{- end }}
{{- end }}

{{/*
The signing key Secret and the files the sidecar reads from it.
*/}}
{{- define "toolio-sidecar.signingSecretName" -}}
{{- if .Values.signing.existingSecret }}
{{- .Values.signing.existingSecret }}
{{- else }}
{{- printf "%s-signing" (include "toolio-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "toolio-sidecar.signingKeyNames" -}}
{{- if .Values.signing.existingSecret }}
{{- toJson .Values.signing.existingSecretKeys }}
{{- else }}
{{- toJson (list "signing-key.pem") }}
{{- end }}
{{- end }}

{{/*
The Secret's data, computed once per render and shared by secret.yaml and the pod's
checksum/secret annotation. A generated key is read back from the cluster with `lookup`
so that upgrades keep it; only a first install (or an offline render) makes a new one.
For an existingSecret the data is only hashed, so that rotating it rolls the pods on
the next upgrade.
*/}}
{{- define "toolio-sidecar.signingSecretData" -}}
{{- if not (hasKey .Values "__toolioSidecarSigningData") }}
{{- $data := dict }}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "toolio-sidecar.signingSecretName" .) | default dict }}
{{- if .Values.signing.existingSecret }}
{{- $data = get $live "data" | default dict }}
{{- else }}
{{- $pem := dig "data" "signing-key.pem" "" $live }}
{{- if not $pem }}
{{- $pem = genPrivateKey "ecdsa" | b64enc }}
{{- end }}
{{- $data = dict "signing-key.pem" $pem }}
{{- end }}
{{- $_ := set .Values "__toolioSidecarSigningData" $data }}
{{- end }}
{{- toJson (get .Values "__toolioSidecarSigningData") }}
{{- end }}

{{/*
Pod termination budget: the preStop sleep, then SIGTERM and shutdown_grace_seconds of
draining, plus slack.
*/}}
{{- define "toolio-sidecar.shutdownGraceSeconds" -}}
{{- int (ceil (float64 (dig "shutdown_grace_seconds" 20 .Values.config))) }}
{{- end }}

{{- define "toolio-sidecar.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int .Values.preStopSleepSeconds) (int (include "toolio-sidecar.shutdownGraceSeconds" .)) 10 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
A preStop hook that sleeps. Kubernetes >= 1.30 has the `sleep` action, which needs no
binary in the image; older clusters fall back to exec'ing sleep.
Call with (dict "root" $ "seconds" N).
*/}}
{{- define "toolio-sidecar.preStopSleep" -}}
preStop:
{{- if semverCompare ">=1.30-0" .root.Capabilities.KubeVersion.Version }}
  sleep:
    seconds: {{ .seconds }}
{{- else }}
  exec:
    command: ["sleep", "{{ .seconds }}"]
{{- end }}
{{- end }}

{{/*
The first role (by name) that grants config.admin.required_permission; used by NOTES.
*/}}
{{- define "toolio-sidecar.requiredPermission" -}}
{{- dig "admin" "required_permission" "org:settings" .Values.config }}
{{- end }}

{{- define "toolio-sidecar.adminRole" -}}
{{- $permission := include "toolio-sidecar.requiredPermission" . }}
{{- $roles := .Values.config.roles | default dict }}
{{- $found := list }}
{{- range $name := keys $roles | sortAlpha }}
{{- $role := index $roles $name | default dict }}
{{- if has $permission (get $role "permissions" | default list) }}
{{- $found = append $found $name }}
{{- end }}
{{- end }}
{{- if not $roles }}org-admin{{- else if $found }}{{ first $found }}{{- end }}
{{- end }}

{{/*
config.toml. TOML strings, numbers, booleans and string arrays are written with toJson,
whose output is valid TOML for those types; null values are left out (the sidecar's
default applies). Keys that are not bare TOML keys are quoted.
*/}}
{{- define "toolio-sidecar.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "toolio-sidecar.tomlTable" -}}
{{- $table := .table }}
{{- $prefix := .prefix }}
{{- $scalars := list }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := index $table $key }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value)) }}
{{- $scalars = append $scalars $key }}
{{- end }}
{{- end }}
{{- if and $prefix (or $scalars (not $table)) }}

[{{ $prefix }}]
{{- end }}
{{- range $key := $scalars }}
{{ include "toolio-sidecar.tomlKey" $key }} = {{ toJson (index $table $key) }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := index $table $key }}
{{- if kindIs "map" $value }}
{{- $name := include "toolio-sidecar.tomlKey" $key }}
{{- if $prefix }}{{ $name = printf "%s.%s" $prefix $name }}{{ end }}
{{- include "toolio-sidecar.tomlTable" (dict "table" $value "prefix" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The effective config: the `config` values plus the keys the chart owns.
*/}}
{{- define "toolio-sidecar.config" -}}
{{- include "toolio-sidecar.configFor" (dict "root" . "signingFiles" true) }}
{{- end }}

{{/*
The migration hook Job's config: the same, minus signing.private_key_files. `migrate` never
signs, and on a first install the chart's generated signing Secret does not exist yet when
pre-install hooks run (the settings loader checks that every listed key file exists).
*/}}
{{- define "toolio-sidecar.migrationConfig" -}}
{{- include "toolio-sidecar.configFor" (dict "root" . "signingFiles" false) }}
{{- end }}

{{- define "toolio-sidecar.configFor" -}}
{{- $root := .root }}
{{- $cfg := deepCopy ($root.Values.config | default dict) }}
{{- $_ := set $cfg "data_dir" (include "toolio-sidecar.dataDir" $root) }}
{{- /* With [workspaces] each request's workspace comes from its host, and the sidecar refuses a
top-level workspace beside the table (docs/reference/config.md, [workspaces]): the default
`workspace: acme` of values.yaml is left out then. A null workspace is left out as any null is. */}}
{{- if include "toolio-sidecar.multiWorkspace" $root }}
{{- $_ = unset $cfg "workspace" }}
{{- end }}
{{- $proxy := get $cfg "proxy" | default dict }}
{{- $_ = set $proxy "listen" (printf "0.0.0.0:%d" (int $root.Values.containerPorts.proxy)) }}
{{- $_ = set $proxy "upstream" (include "toolio-sidecar.upstreamURL" $root) }}
{{- $_ = set $cfg "proxy" $proxy }}
{{- $admin := get $cfg "admin" | default dict }}
{{- $_ = set $admin "listen" (printf "0.0.0.0:%d" (int $root.Values.containerPorts.admin)) }}
{{- $_ = set $cfg "admin" $admin }}
{{- /* An empty store.url is left out: it is the default (SQLite), and with postgres the URL
comes from TOOLIO_SIDECAR_STORE_URL only (validate refuses a non-empty one). */}}
{{- $store := get $cfg "store" }}
{{- if and (kindIs "map" $store) (not (get $store "url")) }}
{{- $_ = unset $store "url" }}
{{- end }}
{{- if .signingFiles }}
{{- $signing := get $cfg "signing" | default dict }}
{{- $files := list }}
{{- range $key := include "toolio-sidecar.signingKeyNames" $root | fromJsonArray }}
{{- $files = append $files (printf "%s/%s" (include "toolio-sidecar.signingDir" $root) $key) }}
{{- end }}
{{- $_ = set $signing "private_key_files" $files }}
{{- $_ = set $cfg "signing" $signing }}
{{- end }}
{{- include "toolio-sidecar.tomlTable" (dict "table" $cfg "prefix" "") }}
{{- end }}

{{/*
The store. "postgres": the URL reaches the pod only as TOOLIO_SIDECAR_STORE_URL from a Secret
(it carries a password), never through values or the ConfigMap.
*/}}
{{- define "toolio-sidecar.postgres" -}}
{{- if eq .Values.store.type "postgres" }}true{{ end }}
{{- end }}

{{- define "toolio-sidecar.storeEnv" -}}
{{- if include "toolio-sidecar.postgres" . }}
- name: TOOLIO_SIDECAR_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.postgres.existingSecret | quote }}
      key: {{ .Values.store.postgres.secretKey | quote }}
{{- end }}
{{- with .Values.limits.redis.existingSecret }}
- name: TOOLIO_SIDECAR_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.limits.redis.secretKey | quote }}
{{- end }}
{{- end }}

{{/*
"true" when more than one pod can run: replicaCount > 1, or an autoscaler that may go above 1.
*/}}
{{- define "toolio-sidecar.multiReplica" -}}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/*
podDisruptionBudget.enabled: true / false, or null for "when more than one pod can run".
*/}}
{{- define "toolio-sidecar.pdbEnabled" -}}
{{- $enabled := .Values.podDisruptionBudget.enabled }}
{{- if kindIs "invalid" $enabled }}{{ include "toolio-sidecar.multiReplica" . }}
{{- else if $enabled }}true
{{- end }}
{{- end }}

{{/*
The migration hook Job runs with the postgres store only (SQLite migrates in the pod that
owns the volume).
*/}}
{{- define "toolio-sidecar.migrationsEnabled" -}}
{{- if and (include "toolio-sidecar.postgres" .) .Values.migrations.enabled }}true{{ end }}
{{- end }}

{{- define "toolio-sidecar.migrationName" -}}
{{- printf "%s-migrate" (include "toolio-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The hook Job's ServiceAccount. The chart's own ServiceAccount is an ordinary release resource,
so it does not exist yet when a pre-install hook runs; only a ServiceAccount made outside the
chart (serviceAccount.create: false) can be used. The Job calls no Kubernetes API.
*/}}
{{- define "toolio-sidecar.migrationServiceAccountName" -}}
{{- if .Values.migrations.serviceAccountName }}
{{- .Values.migrations.serviceAccountName }}
{{- else if .Values.serviceAccount.create }}default
{{- else }}
{{- include "toolio-sidecar.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/*
Labels of the migration Job's pod. No app.kubernetes.io/name: the pod must not match the
selector of the Services, the PodDisruptionBudget or the NetworkPolicy of the sidecar's pods.
*/}}
{{- define "toolio-sidecar.migrationPodLabels" -}}
helm.sh/chart: {{ include "toolio-sidecar.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: migrations
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: toolio
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The pod's affinity: `affinity` when set; otherwise, when more than one pod can run, an
anti-affinity on the node (kubernetes.io/hostname) from `podAntiAffinity` (soft: preferred,
hard: required, none: nothing).
*/}}
{{- define "toolio-sidecar.affinity" -}}
{{- if .Values.affinity }}
{{- toYaml .Values.affinity }}
{{- else if and (include "toolio-sidecar.multiReplica" .) (ne .Values.podAntiAffinity "none") }}
podAntiAffinity:
  {{- if eq .Values.podAntiAffinity "hard" }}
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "toolio-sidecar.selectorLabels" . | nindent 10 }}
  {{- else }}
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "toolio-sidecar.selectorLabels" . | nindent 12 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
topologySpreadConstraints; a constraint without a labelSelector selects this release's pods.
*/}}
{{- define "toolio-sidecar.topologySpreadConstraints" -}}
{{- $selector := include "toolio-sidecar.selectorLabels" . | fromYaml }}
{{- $constraints := list }}
{{- range .Values.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
{{- $constraints = append $constraints $constraint }}
{{- end }}
{{- if $constraints }}{{ toYaml $constraints }}{{ end }}
{{- end }}

{{/*
A rollingUpdate value is zero (0 or "0%").
*/}}
{{- define "toolio-sidecar.isZero" -}}
{{- if or (eq (toString .) "0") (eq (toString .) "0%") }}true{{ end }}
{{- end }}

{{/*
ingress-nginx annotations for `sessionAffinity` (docs/operations.md, Several MCP server pods).
`key` hashes the Authorization header: every request of one API key, the initialize that
creates a 2025-era session included, reaches the same pod. (A hash of Mcp-Session-Id alone
would not: initialize carries no id, so the pod that creates a session is not the one its id
hashes to.) nginx keeps the hash in memory; the key is not logged.
*/}}
{{- define "toolio-sidecar.ingressAffinityAnnotations" -}}
{{- $a := .Values.sessionAffinity }}
{{- if eq $a.mode "key" }}
nginx.ingress.kubernetes.io/upstream-hash-by: "$http_authorization"
{{- else if eq $a.mode "cookie" }}
nginx.ingress.kubernetes.io/affinity: cookie
nginx.ingress.kubernetes.io/affinity-mode: persistent
nginx.ingress.kubernetes.io/session-cookie-name: {{ $a.cookieName | quote }}
nginx.ingress.kubernetes.io/session-cookie-max-age: {{ $a.timeoutSeconds | toString | quote }}
{{- end }}
{{- end }}

{{/*
Roles of the bootstrap admin key: bootstrap.roles, else the role granting the admin permission.
*/}}
{{/*
"true" with many workspaces behind this release: config.workspaces.from_host is set.
*/}}
{{- define "toolio-sidecar.multiWorkspace" -}}
{{- $workspaces := .Values.config.workspaces }}
{{- if and (kindIs "map" $workspaces) (get $workspaces "from_host") }}true{{ end }}
{{- end }}

{{- define "toolio-sidecar.bootstrapRoles" -}}
{{- if .Values.bootstrap.roles }}{{ toJson .Values.bootstrap.roles }}{{ else }}{{ list (include "toolio-sidecar.adminRole" .) | toJson }}{{ end }}
{{- end }}

{{/*
The label selector of this release's scrape job (the admin Service, through the ServiceMonitor),
for alert expressions.
*/}}
{{- define "toolio-sidecar.metricsSelector" -}}
job="{{ include "toolio-sidecar.adminServiceName" . }}",namespace="{{ .Release.Namespace }}"
{{- end }}

{{/*
Checks that stop a render with a message saying what to change.
*/}}
{{- define "toolio-sidecar.validate" -}}
{{- $v := .Values }}
{{- if not (has $v.mode (list "sidecar" "standalone")) }}
{{- fail (printf "toolio-sidecar: mode must be \"sidecar\" or \"standalone\", got %q." (toString $v.mode)) }}
{{- end }}
{{- if and (eq $v.store.type "sqlite") (gt (int $v.replicaCount) 1) }}
{{- fail (printf "toolio-sidecar: replicaCount is %d, but the sqlite store keeps every key in one SQLite file on one volume with a single writer, so it supports exactly 1 replica. Set replicaCount to 1." (int $v.replicaCount)) }}
{{- end }}
{{- if not (has $v.store.type (list "sqlite" "postgres")) }}
{{- fail (printf "toolio-sidecar: store.type must be \"sqlite\" or \"postgres\", got %q." (toString $v.store.type)) }}
{{- end }}
{{- if and (eq $v.store.type "sqlite") $v.autoscaling.enabled }}
{{- fail "toolio-sidecar: autoscaling.enabled is true, but the sqlite store keeps every key in one SQLite file on one volume with a single writer, so it supports exactly 1 replica and cannot be autoscaled. Use store.type: postgres (with store.postgres.existingSecret) to run several replicas." }}
{{- end }}
{{- $postgres := $v.store.postgres | default dict }}
{{- if and (eq $v.store.type "postgres") (not $postgres.existingSecret) }}
{{- fail "toolio-sidecar: store.type is \"postgres\" but store.postgres.existingSecret is empty; create a Secret holding the full postgresql:// URL (e.g. CloudNativePG's <cluster>-app Secret, key uri) and set store.postgres.existingSecret (and store.postgres.secretKey) to it. The chart never takes the URL itself, so that the password stays out of values and manifests." }}
{{- end }}
{{- if and (eq $v.store.type "postgres") (not $postgres.secretKey) }}
{{- fail "toolio-sidecar: store.postgres.secretKey is empty; set it to the key of store.postgres.existingSecret that holds the postgresql:// URL (e.g. url, or uri for CloudNativePG)." }}
{{- end }}
{{- if dig "store" "url" "" ($v.config | default dict) }}
{{- fail "toolio-sidecar: config.store.url must stay empty: a URL there would put the database password in the ConfigMap. Use store.type: postgres with store.postgres.existingSecret, which gives the pod TOOLIO_SIDECAR_STORE_URL from a Secret." }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- $as := $v.autoscaling }}
{{- if gt (int $as.minReplicas) (int $as.maxReplicas) }}
{{- fail (printf "toolio-sidecar: autoscaling.minReplicas (%d) is greater than autoscaling.maxReplicas (%d)." (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- end }}
{{- if not (or $as.targetCPUUtilizationPercentage $as.targetMemoryUtilizationPercentage $as.metrics) }}
{{- fail "toolio-sidecar: autoscaling.enabled needs a metric: set autoscaling.targetCPUUtilizationPercentage, autoscaling.targetMemoryUtilizationPercentage or autoscaling.metrics." }}
{{- end }}
{{- range $resource, $target := dict "cpu" $as.targetCPUUtilizationPercentage "memory" $as.targetMemoryUtilizationPercentage }}
{{- if $target }}
{{- if not (dig "requests" $resource "" ($v.resources | default dict)) }}
{{- fail (printf "toolio-sidecar: autoscaling on %s utilisation needs resources.requests.%s (utilisation is usage / request)." $resource $resource) }}
{{- end }}
{{- if and (eq $v.mode "sidecar") (not (dig "requests" $resource "" ($v.mcpServer.resources | default dict))) }}
{{- fail (printf "toolio-sidecar: autoscaling on %s utilisation in sidecar mode needs mcpServer.resources.requests.%s too: the autoscaler sums usage and requests over every container of the pod, and gives up if one has no request." $resource $resource) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (include "toolio-sidecar.isZero" $v.rollingUpdate.maxSurge) (include "toolio-sidecar.isZero" $v.rollingUpdate.maxUnavailable) }}
{{- fail "toolio-sidecar: rollingUpdate.maxSurge and rollingUpdate.maxUnavailable cannot both be 0; a rolling update could never make progress." }}
{{- end }}
{{- if not (has $v.podAntiAffinity (list "soft" "hard" "none")) }}
{{- fail (printf "toolio-sidecar: podAntiAffinity must be \"soft\", \"hard\" or \"none\", got %q." (toString $v.podAntiAffinity)) }}
{{- end }}
{{- if and (eq $v.mode "sidecar") (not $v.mcpServer.image.repository) }}
{{- fail "toolio-sidecar: mode is \"sidecar\" but mcpServer.image.repository is empty; set it to your MCP server's image (or use mode: standalone with upstream.url)." }}
{{- end }}
{{- if and (eq $v.mode "sidecar") (has (int $v.mcpServer.port) (list (int $v.containerPorts.proxy) (int $v.containerPorts.admin))) }}
{{- fail (printf "toolio-sidecar: mcpServer.port %d clashes with containerPorts (proxy %d, admin %d); containers in one pod share the network namespace." (int $v.mcpServer.port) (int $v.containerPorts.proxy) (int $v.containerPorts.admin)) }}
{{- end }}
{{- if and (eq $v.mode "standalone") (not $v.upstream.url) }}
{{- fail "toolio-sidecar: mode is \"standalone\" but upstream.url is empty; set it to the MCP server's base URL, e.g. http://toolio-mcp:8000." }}
{{- end }}
{{- range $key := list "data_dir" }}
{{- if hasKey ($v.config | default dict) $key }}
{{- fail (printf "toolio-sidecar: config.%s is set by the chart (the data volume is mounted at %s); remove it from values." $key (include "toolio-sidecar.dataDir" $)) }}
{{- end }}
{{- end }}
{{- range $owned := list "proxy.listen" "proxy.upstream" "admin.listen" "signing.private_key_files" }}
{{- $parts := splitList "." $owned }}
{{- if hasKey (get ($v.config | default dict) (first $parts) | default dict) (last $parts) }}
{{- fail (printf "toolio-sidecar: config.%s is set by the chart (from containerPorts, mode/upstream.url/mcpServer.port and signing); remove it from values." $owned) }}
{{- end }}
{{- end }}
{{- $algorithm := dig "signing" "algorithm" "ES256" ($v.config | default dict) }}
{{- if and (not $v.signing.existingSecret) (ne $algorithm "ES256") }}
{{- fail (printf "toolio-sidecar: config.signing.algorithm is %q, but the generated signing key is ECDSA P-256 (ES256); provide the key in signing.existingSecret to use %s." $algorithm $algorithm) }}
{{- end }}
{{- if and $v.signing.existingSecret (not $v.signing.existingSecretKeys) }}
{{- fail "toolio-sidecar: signing.existingSecret is set but signing.existingSecretKeys is empty; list the key file names in that Secret, newest first." }}
{{- end }}
{{- if and $v.config.roles (not (include "toolio-sidecar.adminRole" .)) }}
{{- fail (printf "toolio-sidecar: no role in config.roles grants config.admin.required_permission %q, so no key could ever use the admin API; add it to a role's permissions." (include "toolio-sidecar.requiredPermission" .)) }}
{{- end }}
{{- $budget := add (int $v.preStopSleepSeconds) (int (include "toolio-sidecar.shutdownGraceSeconds" .)) }}
{{- if le (int (include "toolio-sidecar.terminationGracePeriodSeconds" .)) $budget }}
{{- fail (printf "toolio-sidecar: terminationGracePeriodSeconds (%s) must be greater than preStopSleepSeconds + config.shutdown_grace_seconds (%d), or Kubernetes kills the sidecar before in-flight requests finish." (include "toolio-sidecar.terminationGracePeriodSeconds" .) $budget) }}
{{- end }}
{{- if and $v.httpRoute.enabled (not $v.httpRoute.parentRefs) }}
{{- fail "toolio-sidecar: httpRoute.enabled is true but httpRoute.parentRefs is empty; name the Gateway (and its HTTPS listener) to attach to, e.g. [{name: public, namespace: gateway, sectionName: https}]." }}
{{- end }}
{{- $affinity := $v.sessionAffinity.mode }}
{{- if and (eq $affinity "key") (not $v.ingress.enabled) }}
{{- fail "toolio-sidecar: sessionAffinity.mode \"key\" hashes the Authorization header with ingress-nginx's upstream-hash-by, so it needs ingress.enabled. Gateway API has no portable header hash: use mode \"cookie\" with httpRoute, or your gateway's own consistent-hash policy on the Authorization header (docs/operations.md, Several MCP server pods)." }}
{{- end }}
{{- if and (eq $affinity "cookie") (not (or $v.ingress.enabled $v.httpRoute.enabled)) }}
{{- fail "toolio-sidecar: sessionAffinity.mode \"cookie\" needs ingress.enabled (ingress-nginx) or httpRoute.enabled (Gateway API session persistence), which set the cookie." }}
{{- end }}
{{- if and $v.bootstrap.adminKeySecret $v.config.roles }}
{{- range $role := include "toolio-sidecar.bootstrapRoles" . | fromJsonArray }}
{{- if not (hasKey $v.config.roles $role) }}
{{- fail (printf "toolio-sidecar: bootstrap.roles names %q, which is not in config.roles." $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "toolio-sidecar.multiWorkspace" . }}
{{- if and $v.bootstrap.adminKeySecret (not $v.bootstrap.workspace) }}
{{- fail "toolio-sidecar: config.workspaces.from_host is set, so a key belongs to the workspace named with it: set bootstrap.workspace to the workspace of the bootstrap admin key (it may use the admin API of that workspace only)." }}
{{- end }}
{{- if eq (toString (dig "oauth" "mode" "off" $v.config)) "validate" }}
{{- fail "toolio-sidecar: config.oauth.mode \"validate\" cannot be combined with config.workspaces (docs/reference/config.md, [workspaces]); use \"off\" or \"pass-through\"." }}
{{- end }}
{{- else if $v.bootstrap.workspace }}
{{- if ne (toString $v.bootstrap.workspace) (toString $v.config.workspace) }}
{{- fail (printf "toolio-sidecar: bootstrap.workspace is %q, but this release serves only config.workspace %q; leave bootstrap.workspace empty." (toString $v.bootstrap.workspace) (toString $v.config.workspace)) }}
{{- end }}
{{- end }}
{{- if and (include "toolio-sidecar.pdbEnabled" .) (kindIs "invalid" $v.podDisruptionBudget.minAvailable) (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) }}
{{- fail "toolio-sidecar: the PodDisruptionBudget needs podDisruptionBudget.minAvailable or podDisruptionBudget.maxUnavailable." }}
{{- end }}
{{- end }}
