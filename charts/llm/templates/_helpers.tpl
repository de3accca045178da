{{/*
Names, labels, images and the shared env/volume snippets of the llm chart.
*/}}

{{- define "llm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "llm.fullname" -}}
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

{{- define "llm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A component's resource name: (dict "root" $ "component" "api") -> "<fullname>-api". */}}
{{- define "llm.componentName" -}}
{{- printf "%s-%s" (include "llm.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: (dict "root" $ "component" "api"). Immutable once deployed. */}}
{{- define "llm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels: (dict "root" $ "component" "api"). */}}
{{- define "llm.labels" -}}
helm.sh/chart: {{ include "llm.chart" .root }}
{{ include "llm.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "llm.name" .root }}
{{- end }}

{{/* Pod template labels: the labels above plus podLabels. */}}
{{- define "llm.podLabels" -}}
{{ include "llm.labels" . }}
{{- with .root.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: (dict "root" $ "image" .Values.images.api). A tag may be "1.2",
"1.2@sha256:..." or a bare digest "@sha256:..." (joined without the ':'). */}}
{{- define "llm.image" -}}
{{- $registry := .image.registry | default .root.Values.imageRegistry -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion | toString -}}
{{- $ref := printf "%s%s%s" .image.repository (ternary "" ":" (hasPrefix "@" $tag)) $tag -}}
{{- if $registry -}}
{{- printf "%s/%s" $registry $ref -}}
{{- else -}}
{{- $ref -}}
{{- end -}}
{{- end }}

{{/* The worker's image: the CUDA build when worker.gpu.enabled. */}}
{{- define "llm.workerImage" -}}
{{- if .Values.worker.gpu.enabled -}}
{{- include "llm.image" (dict "root" . "image" .Values.images.workerGpu) -}}
{{- else -}}
{{- include "llm.image" (dict "root" . "image" .Values.images.worker) -}}
{{- end -}}
{{- end }}

{{- define "llm.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- Redis */}}

{{- define "llm.redis.serviceName" -}}
{{- include "llm.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/* In-cluster host of the Redis Service: "<svc>.<namespace>.svc". */}}
{{- define "llm.redis.host" -}}
{{- printf "%s.%s.svc" (include "llm.redis.serviceName" .) .Release.Namespace }}
{{- end }}

{{/* Secret holding the in-cluster Redis password. */}}
{{- define "llm.redis.secretName" -}}
{{- .Values.redis.auth.existingSecret | default (include "llm.redis.serviceName" .) }}
{{- end }}

{{/* Secret holding redis.auth.previousPassword while a rotation is in progress (Redis only). */}}
{{- define "llm.redis.previousSecretName" -}}
{{- printf "%s-previous" (include "llm.redis.serviceName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret holding the external Redis URL. */}}
{{- define "llm.redis.externalSecretName" -}}
{{- .Values.redis.external.existingSecret | default (printf "%s-external" (include "llm.redis.serviceName" .)) }}
{{- end }}

{{/* Env vars giving a container LLM_REDIS_URL (password only ever read from a Secret). */}}
{{- define "llm.redis.env" -}}
{{- if .Values.redis.enabled }}
# The settings put the password into the URL encoded, so it may hold any character.
- name: LLM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "llm.redis.secretName" . }}
      key: {{ .Values.redis.auth.existingSecretPasswordKey }}
- name: LLM_REDIS_URL
  value: {{ printf "redis://%s:%d/%d" (include "llm.redis.host" .) (int .Values.redis.port) (int .Values.redis.database) | quote }}
{{- else }}
- name: LLM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "llm.redis.externalSecretName" . }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- MLflow */}}

{{- define "llm.mlflow.serviceName" -}}
{{- include "llm.componentName" (dict "root" . "component" "mlflow") }}
{{- end }}

{{/* MLFLOW_TRACKING_URI: the in-cluster Service, or mlflow.external.trackingUri. */}}
{{- define "llm.mlflow.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "llm.mlflow.serviceName" .) .Release.Namespace (int .Values.mlflow.service.port) -}}
{{- else -}}
{{- .Values.mlflow.external.trackingUri -}}
{{- end -}}
{{- end }}

{{/* ---------------------------------------------------------------- shared env and volumes */}}

{{- define "llm.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (include "llm.componentName" (dict "root" . "component" "api-keys")) }}
{{- end }}

{{/* Env of the API and the workers: settings, Redis, MLflow, and for the API (only: no worker
reads them, and a key rotation must not drain every worker) the API keys.
(dict "root" $ "apiKeys" bool) */}}
{{- define "llm.appEnv" -}}
{{- with .root }}
- name: HOME
  value: /tmp
{{ include "llm.redis.env" . }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "llm.mlflow.trackingUri" . | quote }}
- name: LLM_MODEL_URI
  value: {{ .Values.settings.modelUri | quote }}
{{- /* int64 first: a number in a values file arrives as a float, which quote prints as
1.2096e+06 for 1209600, a value Settings refuse (every pod crash-looped). */}}
- name: LLM_MAX_NEW_TOKENS
  value: {{ int64 .Values.settings.maxNewTokens | quote }}
- name: LLM_JOB_TTL_S
  value: {{ int64 .Values.settings.jobTtlS | quote }}
- name: LLM_MAX_BATCH
  value: {{ int64 .Values.settings.maxBatch | quote }}
- name: LLM_ENGINE_STALL_S
  value: {{ int64 .Values.settings.engineStallS | quote }}
{{- if and $.apiKeys (or .Values.apiKeys.keys .Values.apiKeys.existingSecret) }}
- name: LLM_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "llm.apiKeysSecretName" . }}
      key: LLM_API_KEYS
{{- end }}
{{- with .Values.settings.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
checksum/secrets of a pod: a hash of the values that define the Secrets it reads at start, so a
changed key or password rolls it. Not a hash of the rendered secrets.yaml: a generated Redis
password is random in every render (the cluster's copy is kept by lookup, which helm template
and --dry-run lack), and the pods would differ on every upgrade. A Secret the chart does not
write (an existingSecret) is represented by its name only: rotating its data rolls nothing.
(dict "root" $ "parts" (list ...)), each part the values one kind of pod reads:
  redis          the Redis URL or password the clients use (not redis.auth.previousPassword:
                 dropping it after a rotation must not roll every client again)
  redisServer    all of redis.auth, previousPassword included (Redis's own pod)
  apiKeys        apiKeys (the API only)
  mlflowBackend  mlflow.backend.postgres (the MLflow server)
Anyone allowed to read pods reads the annotation, and a plain sha256 of a short key or password
can be guessed offline: derivePassword runs it through scrypt (memory-hard, ~0.1 s a guess),
salted with the release's namespace and name, before the hash.
*/}}
{{- define "llm.secretsChecksum" -}}
{{- $v := .root.Values }}
{{- $all := dict
  "redis" (dict "enabled" $v.redis.enabled "auth" (omit $v.redis.auth "previousPassword" "generate") "external" $v.redis.external)
  "redisServer" (dict "enabled" $v.redis.enabled "auth" (omit $v.redis.auth "generate"))
  "apiKeys" $v.apiKeys
  "mlflowBackend" $v.mlflow.backend.postgres }}
{{- $inputs := dict }}
{{- range .parts }}
{{- $_ := set $inputs . (required (printf "llm.secretsChecksum: no part %q" .) (get $all .)) }}
{{- end }}
{{- derivePassword 1 "maximum" (toJson $inputs) .root.Release.Namespace (printf "%s/checksum-secrets" .root.Release.Name) | sha256sum }}
{{- end }}

{{/* "true" when settings.extraEnv sets the variable: (dict "root" $ "name" "OMP_NUM_THREADS"). */}}
{{- define "llm.extraEnvHas" -}}
{{- $name := .name }}
{{- range .root.Values.settings.extraEnv }}
{{- if eq .name $name }}true{{ end }}
{{- end }}
{{- end }}

{{/* Hydra config files shipped in the chart (files/config is a link to the repository's config/). */}}
{{- define "llm.hydraConfig.files" -}}
{{- range $path, $_ := .Files.Glob "files/config/**.yaml" }}
{{ $path }}
{{- end }}
{{- end }}

{{- define "llm.hydraConfig.enabled" -}}
{{- if and .Values.hydraConfig.enabled (.Files.Glob "files/config/**.yaml") }}true{{ end }}
{{- end }}

{{/* ConfigMap key of a config file: "files/config/model/tiny.yaml" -> "model__tiny.yaml". */}}
{{- define "llm.hydraConfig.key" -}}
{{- trimPrefix "files/config/" . | replace "/" "__" }}
{{- end }}

{{/* Volumes every pod of the chart has: (dict "root" $ "hydra" true). */}}
{{- define "llm.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpSizeLimit }}
{{- if and .hydra (include "llm.hydraConfig.enabled" .root) }}
- name: hydra-config
  configMap:
    name: {{ include "llm.componentName" (dict "root" .root "component" "config") }}
    items:
{{- range $path, $_ := .root.Files.Glob "files/config/**.yaml" }}
      - key: {{ include "llm.hydraConfig.key" $path }}
        path: {{ trimPrefix "files/config/" $path }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and .hydra (include "llm.hydraConfig.enabled" .root) }}
- name: hydra-config
  mountPath: /app/config
  readOnly: true
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- training */}}

{{/* The PyTorchJob's name: training.name (or "<fullname>-train"), then "-<runId>" if set. */}}
{{- define "llm.training.name" -}}
{{- $name := .Values.training.name | default (include "llm.componentName" (dict "root" . "component" "train")) }}
{{- $runId := .Values.training.runId | default "" }}
{{- /* A number in a values file arrives as a float (20261129 would print as 2.0261129e+07). */}}
{{- if kindIs "float64" $runId }}{{ $runId = int64 $runId }}{{ end }}
{{- $runId = toString $runId }}
{{- if $runId }}
{{- $name = printf "%s-%s" $name $runId }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "llm.training.claimName" -}}
{{- .Values.training.checkpoint.existingClaim | default (include "llm.componentName" (dict "root" . "component" "checkpoints")) }}
{{- end }}

{{/* ---------------------------------------------------------------- checks */}}

{{/* Combinations the schema cannot express well: fail early with a clear message. */}}
{{- define "llm.validate" -}}
{{- if and .Values.worker.autoscaling.enabled .Values.worker.keda.enabled }}
{{- fail "worker.autoscaling.enabled and worker.keda.enabled are exclusive: KEDA creates its own HPA for the worker" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- $auth := .Values.redis.auth }}
{{- /* Only an explicit false: values reused from a chart that predates the key (helm upgrade
  --reuse-values) do not have it, and mean the generation they always had. */}}
{{- if and .Values.redis.enabled (hasKey $auth "generate") (eq (toString $auth.generate) "false") (not $auth.password) (not $auth.existingSecret) }}
{{- fail "redis.auth.generate is false: set redis.auth.password or redis.auth.existingSecret (a generated password is kept only by helm install/upgrade; helm template, Argo CD and other GitOps renders make a new one each time)" }}
{{- end }}
{{- if and (not .Values.mlflow.enabled) (not .Values.mlflow.external.trackingUri) }}
{{- fail "mlflow.enabled is false: set mlflow.external.trackingUri" }}
{{- end }}
{{- if and .Values.training.enabled (gt (len (include "llm.training.name" .)) 50) }}
{{- fail (printf "the PyTorchJob name %q is over 50 characters: its pods and Services (<name>-worker-<n>) must fit 63; shorten training.name or training.runId" (include "llm.training.name" .)) }}
{{- end }}
{{- $pdb := .Values.api.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "string" $pdb.minAvailable)) }}
{{- $replicas := ternary .Values.api.autoscaling.minReplicas .Values.api.replicaCount .Values.api.autoscaling.enabled }}
{{- if ge (int $pdb.minAvailable) (int $replicas) }}
{{- fail (printf "api.podDisruptionBudget.minAvailable (%d) must be below the API's replicas (%d): otherwise no API pod may ever be evicted and node drains hang; use maxUnavailable" (int $pdb.minAvailable) (int $replicas)) }}
{{- end }}
{{- end }}
{{- /* Settings' rule (services/common/settings.py); the schema's minimum covers the defaults,
this the values settings.extraEnv may set. */}}
{{- $visibility := 3600.0 }}
{{- $timeLimit := 600.0 }}
{{- range .Values.settings.extraEnv }}
{{- if and (eq .name "LLM_VISIBILITY_TIMEOUT_S") (hasKey . "value") }}{{ $visibility = float64 .value }}{{ end }}
{{- if and (eq .name "LLM_JOB_TIME_LIMIT_S") (hasKey . "value") }}{{ $timeLimit = float64 .value }}{{ end }}
{{- end }}
{{- if le (float64 .Values.settings.jobTtlS) (addf $visibility $timeLimit) }}
{{- fail (printf "settings.jobTtlS (%d) must exceed LLM_VISIBILITY_TIMEOUT_S + LLM_JOB_TIME_LIMIT_S (%g + %g): a job whose worker died is delivered again only after the visibility timeout, and its record must outlive that" (int64 .Values.settings.jobTtlS) $visibility $timeLimit) }}
{{- end }}
{{- /* A job taken just before SIGTERM may run until its deadline (LLM_JOB_TIME_LIMIT_S after it
was submitted); after that the worker still records it, acks it and joins its threads (up to
30 s). A SIGKILL before then leaves the record running until the visibility timeout, and the
job runs again from the start. */}}
{{- $workerGrace := float64 .Values.worker.terminationGracePeriodSeconds }}
{{- if and .Values.worker.enabled (lt $workerGrace (addf $timeLimit 60.0)) }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be at least LLM_JOB_TIME_LIMIT_S + 60 (%g + 60): a running job may take the whole time limit after SIGTERM, and the worker then records and acks it; SIGKILL before that leaves it running until the visibility timeout and runs it again. Raise worker.terminationGracePeriodSeconds to %d or more, or lower LLM_JOB_TIME_LIMIT_S in settings.extraEnv" (int64 $workerGrace) $timeLimit (int64 (addf $timeLimit 60.0))) }}
{{- end }}
{{- /* The kubelet kills the API at the end of its grace period, preStop included; uvicorn gets
SIGTERM only after preStop and drains for what is left, less 5 s (api-deployment.yaml). */}}
{{- $apiGrace := int .Values.api.terminationGracePeriodSeconds }}
{{- $preStop := int .Values.api.preStopSleepSeconds }}
{{- if lt (sub (sub $apiGrace $preStop) 5) 1 }}
{{- fail (printf "api.terminationGracePeriodSeconds (%d) must be at least api.preStopSleepSeconds + 6 (%d + 6): the kubelet kills the pod when the grace period ends, preStop included, and uvicorn gets SIGTERM only after preStop, with the rest less 5 s to finish open requests; raise api.terminationGracePeriodSeconds to %d or more, or lower api.preStopSleepSeconds" $apiGrace $preStop (add $preStop 6)) }}
{{- end }}
{{- if and .Values.api.ingress.enabled (not .Values.api.ingress.allowAnonymous) (not (include "llm.apiKeysConfigured" .)) }}
{{- fail "api.ingress.enabled without API keys would let anyone submit jobs: set apiKeys.existingSecret (key LLM_API_KEYS) or apiKeys.keys, or api.ingress.allowAnonymous=true if something else authenticates" }}
{{- end }}
{{- end }}

{{/* The LLM_API_KEYS the API ends up with, for other pods (the helm test): settings.extraEnv's
entries when it has one (they follow the chart's in llm.appEnv, and the last of a name wins),
else the chart's or the existing Secret; nothing without keys. */}}
{{- define "llm.apiKeysEnv" -}}
{{- if include "llm.extraEnvHas" (dict "root" . "name" "LLM_API_KEYS") }}
{{- range .Values.settings.extraEnv }}
{{- if eq .name "LLM_API_KEYS" }}
{{ list . | toYaml }}
{{- end }}
{{- end }}
{{- else if or .Values.apiKeys.keys .Values.apiKeys.existingSecret }}
- name: LLM_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "llm.apiKeysSecretName" . }}
      key: LLM_API_KEYS
{{- end }}
{{- end }}

{{/* "true" when the API gets LLM_API_KEYS: from the chart's Secret, an existing one, or extraEnv. */}}
{{- define "llm.apiKeysConfigured" -}}
{{- if or .Values.apiKeys.keys .Values.apiKeys.existingSecret (include "llm.extraEnvHas" (dict "root" . "name" "LLM_API_KEYS")) }}true{{ end }}
{{- end }}
