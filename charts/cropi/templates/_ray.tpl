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
  {{- include "cropi.imagePullSecrets" .ctx | nindent 2 }}
  securityContext:
    {{- include "cropi.podSecurityContext" .ctx | nindent 4 }}
  containers:
    - name: {{ .container }}
      image: {{ include "cropi.image.for" (dict "ctx" .ctx "gpus" .gpus) }}
      imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
      securityContext:
        {{- include "cropi.containerSecurityContext" .ctx | nindent 8 }}
      resources:
        {{- include "cropi.gpuResources" (dict "resources" $n.resources "gpus" .gpus "gpuResource" ($n.gpuResource | default "nvidia.com/gpu")) | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
  volumes:
    {{- include "cropi.tmpVolume" .ctx | nindent 4 }}
    # Ray's object store and NCCL live in /dev/shm; the container default (64 MiB) is far too small.
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ $n.shmSize }}}
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
