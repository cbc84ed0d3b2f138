{{/* Names and labels shared by every template. */}}
{{- define "tuneforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tuneforge.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tuneforge.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tuneforge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tuneforge.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) -}}
{{- end -}}

{{- define "tuneforge.configName" -}}{{ include "tuneforge.fullname" . }}-config{{- end -}}
{{- define "tuneforge.workerServiceAccount" -}}{{ include "tuneforge.fullname" . }}-worker{{- end -}}

{{/* The environment every platform container gets: settings from the ConfigMap, credentials from
     the external Secrets (referenced, never copied). */}}
{{- define "tuneforge.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "tuneforge.configName" . }}
  - secretRef:
      name: {{ .Values.objectStorage.existingSecret }}
env:
  - name: TUNEFORGE_DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ .Values.externalDatabase.existingSecret }}
        key: {{ .Values.externalDatabase.secretKey }}
  - name: TUNEFORGE_BROKER_URL
    valueFrom:
      secretKeyRef:
        name: {{ .Values.externalRedis.existingSecret }}
        key: {{ .Values.externalRedis.secretKey }}
{{- end -}}

{{/* The fleet class named .name, as a dict (empty when absent: the schema check fails first). */}}
{{- define "tuneforge.gpuClass" -}}
{{- $found := dict -}}
{{- range .root.Values.fleet.classes -}}
{{- if eq .name $.name -}}{{- $found = . -}}{{- end -}}
{{- end -}}
{{- toJson $found -}}
{{- end -}}

{{- define "tuneforge.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  fsGroup: 1000
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "tuneforge.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    drop: ["ALL"]
{{- end -}}
