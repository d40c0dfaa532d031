{{- define "kontrast.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kontrast.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kontrast.operatorName" -}}
{{- printf "%s-operator" (include "kontrast.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kontrast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kontrast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kontrast.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kontrast.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kontrast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kontrast.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kontrast.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kontrast.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{/*
The operator's permissions in a namespace (in a ClusterRole when it watches all namespaces, in
a Role per namespace otherwise). Least privilege, verb by verb:
- trainjobs: watch them; patch for kopf's own annotations (handler progress, the diff base).
  The operator never writes spec.
- trainjobs/status: phase and conditions. Holding get+patch here is also what lets it create
  the per-job Role that grants exactly these verbs (RBAC escalation prevention).
- trainjobs/finalizers: set blockOwnerDeletion on children (OwnerReferencesPermissionEnforcement).
- jobs: the worker Jobs (patch: release a new attempt held until the old pods are gone);
  pods: read only (exit codes, termination messages, disruptions).
- services, configmaps, serviceaccounts, roles, rolebindings: the per-job children.
- events: milestones and failures on the TrainJob.
- workloads (Kueue): read only, to say in status why Kueue holds a worker Job.
*/}}
{{- define "kontrast.rules" -}}
- apiGroups: [kontrast.dev]
  resources: [trainjobs]
  verbs: [get, list, watch, patch, delete]   # delete: spec.scheduling.ttlSecondsAfterFinished
- apiGroups: [kontrast.dev]
  resources: [trainjobs/status]
  verbs: [get, patch]
- apiGroups: [kontrast.dev]
  resources: [trainjobs/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [services, configmaps, serviceaccounts]
  verbs: [get, list, watch, create, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [list, create, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch]
{{- end -}}

{{/* A policy binding's scope: the watched namespaces, or every namespace. */}}
{{- define "kontrast.policyNamespaces" -}}
{{- with .Values.watchNamespaces -}}
matchResources:
  namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values: {{ toJson . }}
{{- end -}}
{{- end -}}
