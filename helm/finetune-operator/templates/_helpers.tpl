{{- define "fto.name" -}}finetune-operator{{- end -}}
{{- define "fto.fullname" -}}
{{- if contains "finetune-operator" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-finetune-operator" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "fto.labels" -}}
app.kubernetes.io/name: {{ include "fto.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "fto.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fto.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "fto.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "fto.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
