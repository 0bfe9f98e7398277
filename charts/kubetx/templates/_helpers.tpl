{{/* Chart name, at most 63 characters. */}}
{{- define "kubetx.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of every resource: the release name, with the chart name unless it has it. */}}
{{- define "kubetx.fullname" -}}
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

{{/* chart-version, the value of the helm.sh/chart label. */}}
{{- define "kubetx.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "kubetx.labels" -}}
helm.sh/chart: {{ include "kubetx.chart" . }}
{{ include "kubetx.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: kubetx
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "kubetx.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetx.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Name of the ServiceAccount. */}}
{{- define "kubetx.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetx.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest, or repository:tag (appVersion by default). */}}
{{- define "kubetx.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/* "true" when leader election is on: as set, or above one replica when null. */}}
{{- define "kubetx.leaderElection" -}}
{{- if kindIs "invalid" .Values.leaderElection.enabled }}
{{- gt (int .Values.replicaCount) 1 }}
{{- else }}
{{- .Values.leaderElection.enabled }}
{{- end }}
{{- end }}

{{/* Name of the leader Lease. */}}
{{- define "kubetx.leaseName" -}}
{{- default (printf "%s-leader" (include "kubetx.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/* host:port to listen on for a port of .Values.ports. */}}
{{- define "kubetx.listen" -}}
{{- $host := .root.Values.bindAddress | toString }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int .port) }}
{{- else }}
{{- printf "%s:%d" $host (int .port) }}
{{- end }}
{{- end }}

{{/* "true" when the store is a SQL database. */}}
{{- define "kubetx.sqlStore" -}}
{{- has .Values.store.type (list "postgres" "mysql") }}
{{- end }}

{{/* Port of the SQL database. */}}
{{- define "kubetx.databasePort" -}}
{{- if not (kindIs "invalid" .Values.store.port) }}
{{- .Values.store.port | int }}
{{- else if eq .Values.store.type "mysql" }}
{{- 3306 }}
{{- else }}
{{- 5432 }}
{{- end }}
{{- end }}

{{/*
Namespaces that get a Role for Secrets, as a JSON list; ["*"] means cluster-wide (a ClusterRole
rule), which only happens when every namespace is watched.
*/}}
{{- define "kubetx.secretNamespaces" -}}
{{- $wanted := .Values.rbac.secretNamespaces }}
{{- if has "*" $wanted }}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list "*" | toJson }}
{{- end }}
{{- else }}
{{- $wanted | uniq | toJson }}
{{- end }}
{{- end }}

{{/* Checks of value combinations that would deploy something broken or unsafe. */}}
{{- define "kubetx.validate" -}}
{{- if and .Values.api.tls.clientCaSecret (not .Values.api.tls.existingSecret) }}
{{- fail "api.tls.clientCaSecret (mTLS) needs api.tls.existingSecret: client certificates are checked on a TLS listener only" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (ne (include "kubetx.leaderElection" .) "true") }}
{{- fail "replicaCount > 1 needs leader election (leaderElection.enabled: true or null): without it every replica would drive the same transactions" }}
{{- end }}
{{- if and (eq (include "kubetx.sqlStore" .) "true") (not .Values.store.existingSecret) }}
{{- fail (printf "store.type %s needs store.existingSecret: the name of a Secret holding the database URL under key %q" .Values.store.type .Values.store.secretKey) }}
{{- end }}
{{- if and .Values.persistence.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail "persistence.enabled keeps one SQLite file for one replica; for replicaCount > 1 use store.type postgres or mysql" }}
{{- end }}
{{- if and .Values.watchNamespaces .Values.rbac.secretNamespaces (not (has "*" .Values.rbac.secretNamespaces)) }}
{{- range .Values.rbac.secretNamespaces }}
{{- if not (has . $.Values.watchNamespaces) }}
{{- fail (printf "rbac.secretNamespaces names %q, which is not in watchNamespaces: the operator reads Secrets only where it reconciles resources" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* RBAC rules of the reconcilers, in every watched namespace (or cluster-wide). */}}
{{- define "kubetx.transactionRules" -}}
# Saga, Tcc and Msg: watched (list, watch), read before a finalizer is removed (get), their
# finalizer added and removed with JSON patches (patch), deleted after their TTL (delete).
- apiGroups: [kubetx.io]
  resources: [sagas, tccs, msgs]
  verbs: [get, list, watch, patch, delete]
# Their status, written with server-side apply (patch), and read again when that write meets a
# conflict (get).
- apiGroups: [kubetx.io]
  resources: [sagas/status, tccs/status, msgs/status]
  verbs: [get, patch]
# Events on phase transitions, in the resource's namespace; a repeat is patched into a series.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* RBAC rule for headers taken from Secrets (valueFrom.secretKeyRef). */}}
{{- define "kubetx.secretRules" -}}
# Header values from Secrets in the resource's namespace (valueFrom.secretKeyRef).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
