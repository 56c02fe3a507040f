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

{{/* The components with an object-store identity of their own (a MinIO user each, or a Secret
     each for an external S3). The Ray pods use the rollout one (the standing app reads weights). */}}
{{- define "cropi.storeComponents" -}}
controller rollout projector trainer
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

{{/* The in-chart MinIO's root credentials (keys root-user, root-password): referenced only by the
     MinIO StatefulSet and its setup Job, never by a cropi pod. */}}
{{- define "cropi.minioRootSecret" -}}
{{- default (printf "%s-minio" (include "cropi.fullname" .)) .Values.objectStore.minio.existingSecret -}}
{{- end -}}

{{/* The object-store credentials of one component. Call with (dict "ctx" $ "component" NAME).
     In-chart MinIO: the component's MinIO user (keys access-key, secret-key), its own Secret.
     External S3: objectStore.external.componentSecrets.<component>, else the shared existingSecret. */}}
{{- define "cropi.s3UserSecret" -}}
{{- $v := .ctx.Values.objectStore -}}
{{- if $v.minio.enabled -}}
{{- default (printf "%s-s3-%s" (include "cropi.fullname" .ctx) .component) (index $v.minio.users .component).existingSecret -}}
{{- else -}}
{{- default $v.external.existingSecret (index ($v.external.componentSecrets | default dict) .component) -}}
{{- end -}}
{{- end -}}

{{/* The MinIO user name of a component created by the chart (its access key). */}}
{{- define "cropi.minioUser" -}}
cropi-{{ . }}
{{- end -}}

{{/* The Ray cluster's token (key auth_token: the key KubeRay's authOptions.secretName requires). */}}
{{- define "cropi.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "cropi.fullname" .)) .Values.ray.auth.existingSecret -}}
{{- end -}}

{{/* A secret value, base64: the value given in values.yaml when there is one (stable for every render,
     `helm template` and GitOps included); else the live Secret's value (`lookup`: an upgrade keeps
     it); else random. `lookup` finds nothing under `helm template` and most GitOps renderers, so
     there the value is new on every render: give it in values or name an existing Secret.
     Call with (dict "ctx" $ "name" SECRET "key" KEY "length" N "value" GIVEN). */}}
{{- define "cropi.secretValue" -}}
{{- if .value -}}
{{- .value | toString | b64enc -}}
{{- else -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- $old := dig "data" .key "" ($live | default dict) -}}
{{- if $old -}}{{ $old }}{{- else -}}{{ randAlphaNum (int .length) | b64enc }}{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where a generated Secret's values come from, as an annotation: "values" when every value was
     given, "generated" when any is the chart's (random on install, read back on upgrade). */}}
{{- define "cropi.secretSource" -}}
cropi.dev/secret-source: {{ ternary "values" "generated" . }}
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

{{/* Redis for the services (cropi/runtime/config.py). Call with the root context. */}}
{{- define "cropi.redisEnv" -}}
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
{{- end -}}

{{/* The object store with one component's own credentials. Call with (dict "ctx" $ "component" NAME). */}}
{{- define "cropi.s3Env" -}}
{{- $v := .ctx.Values.objectStore -}}
{{- $secret := include "cropi.s3UserSecret" . }}
- name: CROPI_STORE
  value: {{ printf "s3://%s/%s" $v.bucket $v.prefix | trimSuffix "/" | quote }}
{{- if $v.minio.enabled }}
- name: CROPI_S3_ENDPOINT
  value: "{{ include "cropi.minioHost" .ctx }}:9000"
- name: CROPI_S3_SECURE
  value: "0"
- name: CROPI_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: access-key}
- name: CROPI_S3_SECRET_KEY
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: secret-key}
{{- else }}
- name: CROPI_S3_ENDPOINT
  value: {{ $v.external.endpoint | quote }}
- name: CROPI_S3_SECURE
  value: {{ ternary "1" "0" $v.external.secure | quote }}
{{- if eq ($v.external.credentials | default "static") "static" }}
- name: CROPI_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $v.external.accessKeyKey }}}
- name: CROPI_S3_SECRET_KEY
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $v.external.secretKeyKey }}}
{{- end }}
{{- /* chain: no keys; the pod's AWS credential chain (cropi/runtime/s3creds.py) finds its own. */}}
{{- end }}
{{- end -}}

{{/* Where the services find Redis and the object store. Call with (dict "ctx" $ "component" NAME). */}}
{{- define "cropi.storeEnv" -}}
{{- include "cropi.redisEnv" .ctx }}
{{- include "cropi.s3Env" . }}
{{- /* The folders jobs may read data and verifier files from (none: s3:// and built-in data only). */}}
- name: CROPI_DATA_ROOTS
  value: {{ join ":" .ctx.Values.controller.dataRoots | quote }}
{{- end -}}

{{/* Ray token authentication (Ray >= 2.52): on every Ray node and every Ray client (the task
     workers). The token comes from the Secret, never inline. Call with the root context. */}}
{{- define "cropi.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "cropi.rayAuthSecret" . }}, key: auth_token}
{{- end }}
{{- end -}}

{{/* The bucket policy of a component's MinIO user: what it may read and write in the store (key
     patterns under s3://<bucket>/<prefix>, cropi/curriculum/layout.py). With accessScope "store"
     every user reads and writes the whole store prefix instead. Listing the bucket's key names and
     its location is allowed to every user (the S3 client checks the bucket exists and asks its
     region; MinIO checks HEAD bucket as ListBucket, which a prefix condition would refuse). No user
     may delete, administer MinIO, or touch another bucket.
     Call with (dict "ctx" $ "component" NAME); prints JSON. */}}
{{- define "cropi.minioAccess" -}}
{{- /* `*` matches any characters, '/' included (S3 and MinIO resource patterns). Offline parts are
       jobs/<job>/offline/<set>/part-<i>.parquet; jobs/<job>/offline/timing.json is the controller's. */ -}}
{{- $rw := dict
    "controller" (list "jobs/*/spec.yaml" "jobs/*/events.jsonl" "jobs/*/offline/timing.json" "jobs/*/stages/*/selection.json")
    "rollout" (list "jobs/*/offline/*/part-*")
    "projector" (list "jobs/*/stages/*/grads/*")
    "trainer" (list "jobs/*/trainer/*" "jobs/*/stages/*/metrics.jsonl" "jobs/*/stages/*/checkpoint/*" "jobs/*/final/checkpoint/*") -}}
{{- $ro := dict
    "controller" (list "jobs/*/offline/*/part-*" "jobs/*/stages/*/grads/*")
    "rollout" (list "jobs/*/spec.yaml" "jobs/*/stages/*/checkpoint/*" "jobs/*/final/checkpoint/*" "jobs/*/trainer/weights/*")
    "projector" (list "jobs/*/spec.yaml" "jobs/*/offline/*/part-*" "jobs/*/stages/*/checkpoint/*")
    "trainer" (list "jobs/*/spec.yaml" "jobs/*/stages/*/selection.json") -}}
{{- if eq .ctx.Values.objectStore.minio.accessScope "store" -}}
{{- $rw = dict .component (list "*") -}}
{{- $ro = dict .component (list) -}}
{{- end -}}
{{- toJson (dict "read" (index $ro .component) "readWrite" (index $rw .component)) -}}
{{- end -}}

{{- define "cropi.minioPolicy" -}}
{{- $v := .ctx.Values.objectStore -}}
{{- $root := trimAll "/" $v.prefix -}}
{{- $base := ternary (printf "arn:aws:s3:::%s/%s/" $v.bucket $root) (printf "arn:aws:s3:::%s/" $v.bucket) (ne $root "") -}}
{{- $access := include "cropi.minioAccess" . | fromJson -}}
{{- $read := list -}}
{{- range (concat $access.read $access.readWrite) }}{{ $read = append $read (printf "%s%s" $base .) }}{{ end -}}
{{- $write := list -}}
{{- range $access.readWrite }}{{ $write = append $write (printf "%s%s" $base .) }}{{ end -}}
{{- $statements := list
    (dict "Sid" "Bucket" "Effect" "Allow" "Action" (list "s3:GetBucketLocation" "s3:ListBucket")
          "Resource" (list (printf "arn:aws:s3:::%s" $v.bucket)))
    (dict "Sid" "Read" "Effect" "Allow" "Action" (list "s3:GetObject") "Resource" $read) -}}
{{- if $write -}}
{{- $statements = append $statements (dict "Sid" "Write" "Effect" "Allow"
      "Action" (list "s3:PutObject" "s3:AbortMultipartUpload" "s3:ListMultipartUploadParts") "Resource" $write) -}}
{{- end -}}
{{- toJson (dict "Version" "2012-10-17" "Statement" $statements) -}}
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

{{/* The user's extra entries of a pod: the top-level list first, then the pod's own; an own entry
     with the same `key` (env and volumes: name; mounts: mountPath) replaces the top-level one.
     Prints a YAML list, or nothing when both are empty. Call with
     (dict "all" TOP-LEVEL-LIST "own" POD-LIST "key" "name"). */}}
{{- define "cropi.mergeExtra" -}}
{{- $key := .key -}}
{{- $own := .own | default list -}}
{{- $ownKeys := list -}}
{{- range $own }}{{ $ownKeys = append $ownKeys (get . $key) }}{{ end -}}
{{- $merged := list -}}
{{- range (.all | default list) }}{{ if not (has (get . $key) $ownKeys) }}{{ $merged = append $merged . }}{{ end }}{{ end -}}
{{- $merged = concat $merged $own -}}
{{- if $merged }}{{ toYaml $merged }}{{ end -}}
{{- end -}}

{{/* Extra env, volumes and mounts of a cropi pod. Call with (dict "ctx" $ "own" POD-VALUES). */}}
{{- define "cropi.extraEnv" -}}
{{- include "cropi.mergeExtra" (dict "all" .ctx.Values.extraEnv "own" .own.extraEnv "key" "name") -}}
{{- end -}}
{{- define "cropi.extraVolumes" -}}
{{- include "cropi.mergeExtra" (dict "all" .ctx.Values.extraVolumes "own" .own.extraVolumes "key" "name") -}}
{{- end -}}
{{- define "cropi.extraVolumeMounts" -}}
{{- include "cropi.mergeExtra" (dict "all" .ctx.Values.extraVolumeMounts "own" .own.extraVolumeMounts "key" "mountPath") -}}
{{- end -}}

{{/* The ServiceAccount of the cropi pods (controller, task workers, Ray nodes); empty: none named
     (the namespace's default). */}}
{{- define "cropi.serviceAccountName" -}}
{{- $sa := .Values.serviceAccount -}}
{{- if $sa.create -}}
{{- default (printf "%s-workload" (include "cropi.fullname" .)) $sa.name -}}
{{- else -}}
{{- $sa.name -}}
{{- end -}}
{{- end -}}

{{/* A pod spec's serviceAccountName line, when there is one. Call with the root context. */}}
{{- define "cropi.serviceAccount" -}}
{{- with include "cropi.serviceAccountName" . }}
serviceAccountName: {{ . }}
{{- end }}
{{- end -}}
