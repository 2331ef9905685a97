{{/* Names, labels and the pieces several templates share. */}}

{{- define "llava-triton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llava-triton.fullname" -}}
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

{{- define "llava-triton.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llava-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llava-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llava-triton.labels" -}}
helm.sh/chart: {{ include "llava-triton.chart" . }}
{{ include "llava-triton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The serving pods only (the export Job's pods have component=export). */}}
{{- define "llava-triton.serverSelectorLabels" -}}
{{ include "llava-triton.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "llava-triton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llava-triton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image every container runs: repository:tag, and @digest when image.digest is set. */}}
{{- define "llava-triton.image" -}}
{{- $image := printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- with .Values.image.digest }}
{{- $image = printf "%s@%s" $image . }}
{{- end }}
{{- $image }}
{{- end }}

{{- define "llava-triton.modelClaim" -}}
{{- default (printf "%s-models" (include "llava-triton.fullname" .)) .Values.modelRepository.existingClaim }}
{{- end }}

{{- define "llava-triton.adminSecret" -}}
{{- default (printf "%s-admin" (include "llava-triton.fullname" .)) .Values.restrictedAPIs.existingSecret }}
{{- end }}

{{/* Where the export reads the checkpoint. */}}
{{- define "llava-triton.checkpointPath" -}}
{{- if .Values.checkpoint.download.enabled }}
{{- printf "/models/.checkpoints/%s" (.Values.checkpoint.download.repoId | replace "/" "--") }}
{{- else }}
{{- "/checkpoint" }}
{{- end }}
{{- end }}

{{/*
Everything the export's result depends on, hashed: a new export goes to a new directory (and a new
Job), so pods of the previous release keep serving the previous repository during an upgrade. The
image is there with its digest: a tag pushed again with another build (and a digest given for it)
is a new export, never one the previous build made.
*/}}
{{- define "llava-triton.exportHash" -}}
{{- $settings := dict "engine" .Values.engine "export" (pick .Values.export "device" "dtype" "set") "checkpoint" .Values.checkpoint "image" (include "llava-triton.image" .) }}
{{- $settings | toJson | sha256sum | trunc 10 }}
{{- end }}

{{/* The model repository inside the pods (the claim is mounted at /models). */}}
{{- define "llava-triton.repositoryPath" -}}
{{- if .Values.export.enabled }}
{{- printf "/models/repositories/%s" (include "llava-triton.exportHash" .) }}
{{- else }}
{{- printf "/models/%s" (.Values.modelRepository.path | trimPrefix "/") }}
{{- end }}
{{- end }}

{{- define "llava-triton.exportJobName" -}}
{{- printf "%s-export-%s" (include "llava-triton.fullname" . | trunc 45 | trimSuffix "-") (include "llava-triton.exportHash" .) }}
{{- end }}

{{/* Marker the export writes last; the serving pods wait for it. */}}
{{- define "llava-triton.exportDoneFile" -}}
{{- printf "%s/.export-done" (include "llava-triton.repositoryPath" .) }}
{{- end }}

{{/* Scheduling shared by the serving pods and the export Job (a TensorRT plan is built for the GPU it runs on). */}}
{{- define "llava-triton.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Values that cannot be checked by values.schema.json (they relate two values). */}}
{{- define "llava-triton.validate" -}}
{{- if and (eq (int .Values.gpus) 0) (eq .Values.export.device "cuda") }}
{{- fail "gpus is 0 but export.device is cuda: set export.device=cpu to serve on CPU, or gpus >= 1" }}
{{- end }}
{{- if and (eq (int .Values.gpus) 0) (ne .Values.engine "pytorch") }}
{{- fail (printf "engine %s needs a GPU (gpus >= 1); use engine=pytorch with gpus=0" .Values.engine) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if .Values.openai.enabled }}
{{- range $name, $port := .Values.ports }}
{{- if eq (int $port) (int $.Values.openai.port) }}
{{- fail (printf "openai.port (%d) is also ports.%s" (int $port) $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $stopping := add (int .Values.server.exitTimeoutSeconds) 5 }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $stopping) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed server.exitTimeoutSeconds + the 5 s preStop sleep (%d)" (int .Values.terminationGracePeriodSeconds) (int $stopping)) }}
{{- end }}
{{- end }}

{{/*
checkov's skip annotations (checkov.io/skipN: CHECK=reason) for the findings of the policy scan
this chart accepts (docs/kubernetes.md#policy-scan), rendered only where the finding applies. A
reason must not contain "=" (checkov splits the annotation there). Call with (dict "context" $ "pod" "server")
or "export".
*/}}
{{- define "llava-triton.acceptedFindings" -}}
{{- $values := .context.Values }}
{{- $skips := list }}
{{- if lt (int $values.podSecurityContext.runAsUser) 10000 }}
{{- $skips = append $skips (printf "CKV_K8S_40=uid %d is triton-server, the unprivileged user of NVIDIA's Triton image and the USER of our Dockerfile; the pods run as it with no privilege escalation, no capability and a read-only root" (int $values.podSecurityContext.runAsUser)) }}
{{- end }}
{{- if and (eq .pod "server") $values.restrictedAPIs.enabled }}
{{- $skips = append $skips "CKV_K8S_35=Triton takes the restricted-API key only on its command line; the kubelet expands it there from the Secret through the LLAVA_TRITON_ADMIN_KEY variable" }}
{{- end }}
{{- range $index, $skip := $skips }}
checkov.io/skip{{ add1 $index }}: {{ $skip | quote }}
{{- end }}
{{- end }}
