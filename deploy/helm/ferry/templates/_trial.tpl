{{/* One trial service: a single-pod StatefulSet and its Service.
(dict "ctx" $ "component" "postgresql" "values" .Values.postgresql "port" 5432
 "dataPath" "/var/lib/postgresql/data" "container" (dict ...)) */}}
{{- define "ferry.trialService" -}}
{{- $ctx := .ctx -}}
{{- $name := printf "%s-%s" (include "ferry.fullname" $ctx) .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "ferry.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  selector:
    {{- include "ferry.selectorLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  ports:
    - name: main
      port: {{ .port }}
      targetPort: {{ .port }}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $name }}
  labels:
    {{- include "ferry.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  serviceName: {{ $name }}
  replicas: 1
  selector:
    matchLabels:
      {{- include "ferry.selectorLabels" (dict "ctx" $ctx "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "ferry.labels" $ctx | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
    spec:
      containers:
        - name: {{ .component }}
          image: {{ .values.image }}
          {{- toYaml .container | nindent 10 }}
          ports:
            - name: main
              containerPort: {{ .port }}
          readinessProbe:
            tcpSocket: {port: main}
            periodSeconds: 5
          {{- with .values.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - {name: data, mountPath: {{ .dataPath }}}
      {{- if not .values.storageSize }}
      volumes:
        - name: data
          emptyDir: {}
      {{- end }}
  {{- with .values.storageSize }}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: [ReadWriteOnce]
        resources:
          requests:
            storage: {{ . }}
  {{- end }}
{{- end -}}
