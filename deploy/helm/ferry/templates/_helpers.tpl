{{/* Names: <release>-ferry, or the release name alone when it already says ferry. */}}
{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "api"). */}}
{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ferry.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ferry.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "ferry.fullname" .) -}}
{{- end -}}

{{/* The name clients send for a model, and the name its jobs carry in SQL. */}}
{{- define "ferry.servedName" -}}
{{- .servedModelName | default .model -}}
{{- end -}}

{{- define "ferry.databaseUrl" -}}
{{- if .Values.secrets.databaseUrl -}}
{{- .Values.secrets.databaseUrl -}}
{{- else if .Values.postgresql.enabled -}}
{{- $pg := .Values.postgresql -}}
{{- printf "postgresql+asyncpg://%s:%s@%s-postgresql:5432/%s" $pg.user $pg.password (include "ferry.fullname" .) $pg.database -}}
{{- else -}}
{{- fail "secrets.databaseUrl is required when postgresql.enabled is false (or name secrets.existingSecret)" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.kedaDatabaseUrl" -}}
{{- .Values.secrets.kedaDatabaseUrl | default (include "ferry.databaseUrl" . | replace "postgresql+asyncpg://" "postgresql://") -}}
{{- end -}}

{{- define "ferry.redisUrl" -}}
{{- if .Values.secrets.redisUrl -}}
{{- .Values.secrets.redisUrl -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "ferry.fullname" .) -}}
{{- else -}}
{{- fail "secrets.redisUrl is required when redis.enabled is false (or name secrets.existingSecret)" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.s3EndpointUrl" -}}
{{- if .Values.objectStore.endpointUrl -}}
{{- .Values.objectStore.endpointUrl -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "ferry.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* name: value pairs as env entries. */}}
{{- define "ferry.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* What every Ferry process reads: its database, Redis and object store. */}}
{{- define "ferry.commonEnv" -}}
- name: FERRY_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ include "ferry.secretName" . }}, key: database-url}
- name: FERRY_REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ include "ferry.secretName" . }}, key: redis-url}
- name: FERRY_OBJECT_STORE
  value: {{ .Values.objectStore.type | quote }}
{{- if eq .Values.objectStore.type "s3" }}
{{- with include "ferry.s3EndpointUrl" . }}
- name: FERRY_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: FERRY_S3_BUCKET
  value: {{ .Values.objectStore.bucket | quote }}
- name: FERRY_S3_REGION
  value: {{ .Values.objectStore.region | quote }}
- name: FERRY_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ include "ferry.secretName" . }}, key: s3-access-key-id, optional: true}
- name: FERRY_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "ferry.secretName" . }}, key: s3-secret-access-key, optional: true}
{{- end }}
{{- include "ferry.envMap" .Values.env }}
{{- end -}}

{{/* An external database is migrated before anything starts. The in-chart PostgreSQL
only exists once the release's objects do, so on a first install the API pods migrate it
themselves (an init container, see api.yaml); upgrades migrate first either way. */}}
{{- define "ferry.migrateHook" -}}
{{- ternary "pre-upgrade" "pre-install,pre-upgrade" .Values.postgresql.enabled -}}
{{- end -}}
