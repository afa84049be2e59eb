{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "switchboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; components append "-gateway", "-worker", ... */}}
{{- define "switchboard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "switchboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* Common labels; call with (dict "ctx" $ "component" "gateway"), component optional. */}}
{{- define "switchboard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "switchboard.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: switchboard
{{- end }}

{{- define "switchboard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* True (non-empty) when the chart must create a Secret for REDIS_URL or DATABASE_URL. */}}
{{- define "switchboard.createSecret" -}}
{{- if or (not .Values.redis.existingSecret) (not .Values.database.existingSecret) }}true{{ end }}
{{- end }}

{{/* The data of the chart's Secret: the URLs not taken from an existing Secret. */}}
{{- define "switchboard.secretData" -}}
{{- if not .Values.redis.existingSecret }}
REDIS_URL: {{ required "set redis.url or redis.existingSecret" .Values.redis.url | b64enc | quote }}
{{- end }}
{{- if not .Values.database.existingSecret }}
DATABASE_URL: {{ required "set database.url or database.existingSecret" .Values.database.url | b64enc | quote }}
{{- end }}
{{- end }}

{{/*
Environment of every container: the two URLs from Secrets, the node id, extraEnv.
Call with (dict "ctx" $ "secret" <name of the chart-managed Secret to read>).
*/}}
{{- define "switchboard.env" -}}
{{- $v := .ctx.Values -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret | default .secret }}
      key: {{ ternary $v.redis.existingSecretKey "REDIS_URL" (ne $v.redis.existingSecret "") }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.database.existingSecret | default .secret }}
      key: {{ ternary $v.database.existingSecretKey "DATABASE_URL" (ne $v.database.existingSecret "") }}
- name: NODE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Refuses a release that could not authenticate anybody. */}}
{{- define "switchboard.validate" -}}
{{- if not (or .Values.auth.jwksUrl .Values.auth.publicKey) }}
{{- fail "set auth.jwksUrl (Clerk JWKS) or auth.publicKey (PEM): the gateways verify every handshake" }}
{{- end }}
{{- if lt (int .Values.streamPartitions) 1 }}
{{- fail "streamPartitions must be at least 1" }}
{{- end }}
{{- end }}

{{/* Pod template annotations that roll the pods when the configuration changes. */}}
{{- define "switchboard.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include "switchboard.secretData" . | sha256sum }}
{{- end }}
