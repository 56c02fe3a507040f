{{/* Pod template of a Ray node (head or worker) in the cropi image. KubeRay supplies the
     `ray start` command; the pod supplies identity, security, scratch and shared memory.
     Call with (dict "ctx" $ "component" NAME "container" "ray-head|ray-worker" "node" VALUES
     "gpus" N "rayLabel" true). */}}
{{- define "cropi.rayPod" -}}
{{- $n := .node -}}
metadata:
  labels:
    {{- include "cropi.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
    cropi.dev/ray: "true"
spec:
  automountServiceAccountToken: false
  {{- include "cropi.serviceAccount" .ctx | nindent 2 }}
  {{- include "cropi.imagePullSecrets" .ctx | nindent 2 }}
  securityContext:
    {{- include "cropi.podSecurityContext" .ctx | nindent 4 }}
  containers:
    - name: {{ .container }}
      image: {{ include "cropi.image.for" (dict "ctx" .ctx "gpus" .gpus) }}
      imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
      securityContext:
        {{- include "cropi.containerSecurityContext" .ctx | nindent 8 }}
      {{- $extraEnv := include "cropi.extraEnv" (dict "ctx" .ctx "own" $n) }}
      {{- if or .ctx.Values.ray.auth.enabled .ctx.Values.ray.rolloutService.enabled $extraEnv }}
      env:
        {{- include "cropi.rayAuthEnv" .ctx | nindent 8 }}
        {{- if .ctx.Values.ray.rolloutService.enabled }}
        # The standing rollout app is built on the cluster (not by a job's driver, whose environment
        # per-job apps inherit): its replicas read the weights published in the object store from
        # the Ray nodes' own environment, as the rollout MinIO user (read-only there). No Redis.
        {{- include "cropi.s3Env" (dict "ctx" .ctx "component" "rollout") | nindent 8 }}
        {{- end }}
        {{- with $extraEnv }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- end }}
      resources:
        {{- include "cropi.gpuResources" (dict "resources" $n.resources "gpus" .gpus "gpuResource" ($n.gpuResource | default "nvidia.com/gpu")) | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
        {{- with include "cropi.extraVolumeMounts" (dict "ctx" .ctx "own" $n) }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "cropi.tmpVolume" .ctx | nindent 4 }}
    # Ray's object store and NCCL live in /dev/shm; the container default (64 MiB) is far too small.
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ $n.shmSize }}}
    {{- with include "cropi.extraVolumes" (dict "ctx" .ctx "own" $n) }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- include "cropi.gpuNodeSelector" (dict "nodeSelector" $n.nodeSelector "gpus" .gpus "gpuType" $n.gpuType) | nindent 2 }}
  {{- include "cropi.scheduling" $n | nindent 2 }}
{{- end -}}

{{/* A KubeRay worker group. Call with (dict "ctx" $ "name" GROUP "component" NAME "group" VALUES). */}}
{{- define "cropi.rayWorkerGroup" -}}
{{- $g := .group -}}
- groupName: {{ .name }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams:
    num-cpus: {{ $g.cpus | quote }}
    num-gpus: {{ $g.gpus | quote }}
  template:
    {{- include "cropi.rayPod" (dict "ctx" .ctx "component" .component "container" "ray-worker" "node" $g "gpus" $g.gpus) | nindent 4 }}
{{- end -}}

{{/* The head group: dashboard reachable for KubeRay, Ray Client on 10001 for the workers. */}}
{{- define "cropi.rayHeadGroup" -}}
rayStartParams:
  dashboard-host: 0.0.0.0
  num-cpus: {{ .head.cpus | default 0 | quote }}
  num-gpus: "0"
template:
  {{- include "cropi.rayPod" (dict "ctx" .ctx "component" .component "container" "ray-head" "node" .head "gpus" 0) | nindent 2 }}
{{- end -}}

{{/* The release's one Ray cluster (a RayCluster's spec, or a RayService's rayClusterConfig): the
     head, the projection pool, the ZeRO-3 trainer and, with ray.rollout.replicas > 0, the rollout
     group. Every pod carries the release's labels and cropi.dev/ray: "true" (the NetworkPolicy's
     selector), whichever object owns it. Call with the root context. */}}
{{- define "cropi.rayClusterSpec" -}}
{{- $r := .Values.ray -}}
rayVersion: {{ $r.rayVersion | quote }}
{{- if $r.auth.enabled }}
# Token authentication: KubeRay reads the token from this Secret (key auth_token) to call the
# dashboard, and sets it on the containers it adds; the chart sets it on its own containers too.
authOptions:
  mode: token
  secretName: {{ include "cropi.rayAuthSecret" . }}
{{- end }}
headGroupSpec:
  {{- include "cropi.rayHeadGroup" (dict "ctx" . "component" "ray-head" "head" $r.head) | nindent 2 }}
workerGroupSpecs:
  {{- include "cropi.rayWorkerGroup" (dict "ctx" . "name" "projector" "component" "ray-projector" "group" $r.projector) | nindent 2 }}
  {{- include "cropi.rayWorkerGroup" (dict "ctx" . "name" "trainer" "component" "ray-trainer" "group" $r.trainer) | nindent 2 }}
  {{- if gt (int $r.rollout.replicas) 0 }}
  {{- include "cropi.rayWorkerGroup" (dict "ctx" . "name" "rollout" "component" "ray-rollout" "group" $r.rollout) | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Settings that no schema can check (they relate several keys): fail with the keys' names. */}}
{{- define "cropi.validateRay" -}}
{{- $r := .Values.ray -}}
{{- $s := $r.rolloutService -}}
{{- if and $r.enabled $r.auth.enabled (not (semverCompare ">=2.52.0" $r.rayVersion)) -}}
{{- fail (printf "ray.auth.enabled needs ray.rayVersion >= 2.52.0 (Ray's token authentication, RAY_AUTH_MODE=token), got %s" $r.rayVersion) -}}
{{- end -}}
{{- if $s.enabled -}}
{{- if not $r.enabled -}}
{{- fail "ray.rolloutService.enabled needs ray.enabled: the standing rollout app runs on the release's Ray cluster" -}}
{{- end -}}
{{- $groupGpus := mul (int $r.rollout.replicas) (int $r.rollout.gpus) -}}
{{- if and (eq $s.engine "vllm") (eq (int $groupGpus) 0) -}}
{{- fail "ray.rolloutService.engine vllm needs GPUs: set ray.rollout.replicas and ray.rollout.gpus (and gpuType)" -}}
{{- end -}}
{{- $needed := mul (int $s.replicas) (int $s.tensorParallel) -}}
{{- if and (gt (int $r.rollout.gpus) 0) (gt (int $needed) (int $groupGpus)) -}}
{{- fail (printf "ray.rolloutService needs replicas x tensorParallel = %d GPUs but the ray.rollout group has replicas x gpus = %d" (int $needed) (int $groupGpus)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
