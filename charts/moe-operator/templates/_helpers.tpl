{{/* Names, labels and the operator's command line, shared by all templates. */}}

{{- define "moe-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: "<release>-<chart>", or the release name when it already holds the chart name. */}}
{{- define "moe-operator.fullname" -}}
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

{{- define "moe-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moe-operator.labels" -}}
helm.sh/chart: {{ include "moe-operator.chart" . }}
{{ include "moe-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: moe-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moe-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moe-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "moe-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "moe-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "true" when the operator watches every namespace (watchNamespaces is empty). */}}
{{- define "moe-operator.allNamespaces" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* "true" when some watchNamespaces entry is a kopf pattern (glob, negation or list), whose
     namespaces only kopf can resolve at run time. Same test as kopf's select_specific_namespaces. */}}
{{- define "moe-operator.namespacePatterns" -}}
{{- range .Values.watchNamespaces }}
{{- if regexMatch "[*?!,]" . }}true{{ end }}
{{- end }}
{{- end }}

{{/* "true" when RBAC must be cluster-wide: all namespaces, or namespaces known only at run time. */}}
{{- define "moe-operator.clusterWideRBAC" -}}
{{- if or (include "moe-operator.allNamespaces" .) (include "moe-operator.namespacePatterns" .) }}true{{ end }}
{{- end }}

{{/* The kopf command line (one YAML list item per argument). */}}
{{- define "moe-operator.args" -}}
- run
- --module=moe_operator.handlers
- --liveness=http://0.0.0.0:{{ .Values.healthPort }}/healthz
{{- if eq .Values.logLevel "verbose" }}
- --verbose
{{- else if eq .Values.logLevel "debug" }}
- --debug
{{- else if eq .Values.logLevel "quiet" }}
- --quiet
{{- end }}
- --log-format={{ .Values.logFormat }}
{{- if include "moe-operator.allNamespaces" . }}
- --all-namespaces
{{- else }}
{{- range .Values.watchNamespaces }}
- {{ printf "--namespace=%s" . | quote }}
{{- end }}
{{- end }}
{{- if .Values.peering.enabled }}
- --peering={{ .Values.peering.name }}
- --priority={{ .Values.peering.priority }}
{{- else }}
- --standalone
{{- end }}
{{- end }}
