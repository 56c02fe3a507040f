{{/* Names and labels (Kubernetes recommended labels). */}}
{{- define "cropi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Kept to 40 characters: KubeRay appends "-head-svc" and group names to the RayCluster's (or
     RayService's) name. */}}
{{- define "cropi.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cropi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cropi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Call with (dict "ctx" $ "component" "controller"). */}}
{{- define "cropi.labels" -}}
{{ include "cropi.selectorLabels" . }}
app.kubernetes.io/part-of: cropi
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Matches every pod of this release (NetworkPolicy peers). */}}
{{- define "cropi.releaseSelector" -}}
app.kubernetes.io/name: {{ include "cropi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cropi.image.cpu" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.cpuTag }}
{{- end -}}

{{/* The GPU image for a group with GPUs, else the CPU one. Call with (dict "ctx" $ "gpus" N). */}}
{{- define "cropi.image.for" -}}
{{- if gt (int .gpus) 0 -}}
{{ printf "%s:%s" .ctx.Values.image.repository .ctx.Values.image.gpuTag }}
{{- else -}}
{{ include "cropi.image.cpu" .ctx }}
{{- end -}}
{{- end -}}

{{/* Secure by default: every pod and container of the chart runs as uid 10001 (the images' user). */}}
{{- define "cropi.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cropi.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cropi.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Secret names: an existing Secret when the user names one, else the chart's. */}}
{{- define "cropi.tokenSecret" -}}
{{- default (printf "%s-token" (include "cropi.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "cropi.redisSecret" -}}
{{- if .Values.redis.enabled -}}
{{- default (printf "%s-redis" (include "cropi.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "cropi.s3Secret" -}}
{{- if .Values.objectStore.minio.enabled -}}
{{- default (printf "%s-minio" (include "cropi.fullname" .)) .Values.objectStore.minio.existingSecret -}}
{{- else -}}
{{- .Values.objectStore.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* A generated secret value, kept across upgrades: the live Secret's value when there is one.
     Call with (dict "ctx" $ "name" SECRET "key" KEY "length" N); prints base64. */}}
{{- define "cropi.secretValue" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- $old := dig "data" .key "" ($live | default dict) -}}
{{- if $old -}}{{ $old }}{{- else -}}{{ randAlphaNum (int .length) | b64enc }}{{- end -}}
{{- end -}}

{{- define "cropi.redisHost" -}}
{{ include "cropi.fullname" . }}-redis
{{- end -}}

{{- define "cropi.minioHost" -}}
{{ include "cropi.fullname" . }}-minio
{{- end -}}

{{/* The head Service of the release's Ray cluster: KubeRay names it <RayCluster name>-head-svc, and
     for a RayService <RayService name>-head-svc (stable across the clusters it runs); both objects
     are named <fullname>-ray. */}}
{{- define "cropi.rayHeadService" -}}
{{ include "cropi.fullname" . }}-ray-head-svc
{{- end -}}

{{/* Where the services find Redis and the object store (cropi/runtime/config.py). */}}
{{- define "cropi.storeEnv" -}}
{{- if .Values.redis.enabled }}
- name: CROPI_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "cropi.redisSecret" . }}, key: {{ .Values.redis.auth.passwordKey }}}
- name: CROPI_REDIS_URL
  value: "redis://:$(CROPI_REDIS_PASSWORD)@{{ include "cropi.redisHost" . }}:6379/0"
{{- else if .Values.redis.external.existingSecret }}
- name: CROPI_REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.redis.external.existingSecret }}, key: {{ .Values.redis.external.urlKey }}}
{{- else }}
- name: CROPI_REDIS_URL
  value: {{ .Values.redis.external.url | quote }}
{{- end }}
- name: CROPI_STORE
  value: {{ printf "s3://%s/%s" .Values.objectStore.bucket .Values.objectStore.prefix | trimSuffix "/" | quote }}
{{- if .Values.objectStore.minio.enabled }}
- name: CROPI_S3_ENDPOINT
  value: "{{ include "cropi.minioHost" . }}:9000"
- name: CROPI_S3_SECURE
  value: "0"
- name: CROPI_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "cropi.s3Secret" . }}, key: root-user}
- name: CROPI_S3_SECRET_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "cropi.s3Secret" . }}, key: root-password}
{{- else }}
- name: CROPI_S3_ENDPOINT
  value: {{ .Values.objectStore.external.endpoint | quote }}
- name: CROPI_S3_SECURE
  value: {{ ternary "1" "0" .Values.objectStore.external.secure | quote }}
- name: CROPI_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.objectStore.external.existingSecret }}, key: {{ .Values.objectStore.external.accessKeyKey }}}
- name: CROPI_S3_SECRET_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.objectStore.external.existingSecret }}, key: {{ .Values.objectStore.external.secretKeyKey }}}
{{- end }}
{{- end -}}

{{/* Writable scratch for a read-only root filesystem (the images keep every cache under /tmp). */}}
{{- define "cropi.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Container resources with the GPU limit added. Call with (dict "resources" R "gpus" N "gpuResource" NAME). */}}
{{- define "cropi.gpuResources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := merge (dict .gpuResource (int .gpus)) ($res.limits | default dict) -}}
{{- $requests := merge (dict .gpuResource (int .gpus)) ($res.requests | default dict) -}}
{{- $_ := set $res "limits" $limits -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* nodeSelector of a GPU group: the GPU product label joins the user's selector. */}}
{{- define "cropi.gpuNodeSelector" -}}
{{- $sel := deepCopy (.nodeSelector | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $sel "nvidia.com/gpu.product" .gpuType -}}
{{- end -}}
{{- if $sel -}}
nodeSelector:
{{ toYaml $sel | indent 2 }}
{{- end -}}
{{- end -}}

{{/* Pod scheduling fields shared by every workload. Call with a values block holding
     tolerations/affinity. */}}
{{- define "cropi.scheduling" -}}
{{- with .tolerations }}
tolerations:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}
