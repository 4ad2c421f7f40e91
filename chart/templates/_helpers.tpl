{{/*
Expand the name of the chart.
*/}}
{{- define "tally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, used as the StatefulSet name and so
as the prefix of every pod name (<fullname>-<ordinal>).
If the release name contains the chart name it is used as the full name, so a
release called "tally" gives pods tally-0, tally-1, ...

We truncate at 52 characters, not the usual 63: the StatefulSet controller
labels each pod with controller-revision-hash=<name>-<10-character hash>, a
label value limited to 63 characters, and the headless Service is named
<fullname>-headless, a DNS label limited to 63 characters.
*/}}
{{- define "tally.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The headless Service's name. The StatefulSet's serviceName, the headless
Service's metadata.name, TALLY_PEERS_SERVICE and NOTES.txt all use this one
helper, so they cannot drift apart: pods are <fullname>-N.<this name>.
*/}}
{{- define "tally.headlessServiceName" -}}
{{- printf "%s-headless" (include "tally.fullname" .) }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "tally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "tally.labels" -}}
{{ include "tally.labelsNoComponent" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Common labels less the component, for the helm test pod (component: test).
*/}}
{{- define "tally.labelsNoComponent" -}}
helm.sh/chart: {{ include "tally.chart" . }}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "tally.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: the StatefulSet's selector, both Services' selectors and the
NetworkPolicy's peer rule. The component label keeps the helm test pod (which
shares name and instance) out of the Services' endpoints.
*/}}
{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "tally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tally.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image tag: image.tag, else the chart's appVersion (kept equal to the
tally crate's version).
*/}}
{{- define "tally.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The full image reference; a digest, when given, pins the image.
*/}}
{{- define "tally.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "tally.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
The name of the Secret holding the peer token, and the key inside it.
*/}}
{{- define "tally.tokenSecretName" -}}
{{- default (printf "%s-peer-token" (include "tally.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "tally.tokenSecretKey" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecretKey }}
{{- else -}}
token
{{- end }}
{{- end }}

{{/*
Where things live inside the container. Fixed by the chart, not values: the
config file, the data volume and the token file are wired to each other here.
*/}}
{{- define "tally.configPath" -}}/etc/tally/config.json{{- end }}
{{- define "tally.tokenDir" -}}/etc/tally/token{{- end }}
{{- define "tally.dataDir" -}}/data{{- end }}

{{/*
The tally config file (JSON): config.* from values, keys as tally's config
file spells them. What must agree with the rest of the manifests (listen port,
SRV port name, data directory, identity, headless Service, token file) is set
through the environment instead, which also overrides the image's own ENV.
*/}}
{{- define "tally.configJson" -}}
{{- .Values.config | toPrettyJson }}
{{- end }}

{{/*
Checks the schema cannot express. Each message names the value at fault and
what to do about it.
*/}}
{{- define "tally.validateValues" -}}
{{- $messages := list }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $delay := div (add (int (.Values.config.shutdown_delay_ms | default 0)) 999) 1000 }}
{{- $tallyGrace := add (int .Values.config.shutdown_grace_s) $delay }}
{{- if le $grace $tallyGrace }}
{{- $messages = append $messages (printf "terminationGracePeriodSeconds (%d) must be larger than config.shutdown_delay_ms plus config.shutdown_grace_s (%d s), or Kubernetes kills tally before it finishes draining: raise terminationGracePeriodSeconds or lower config.shutdown_grace_s" $grace $tallyGrace) }}
{{- end }}
{{- if and (gt (int .Values.config.peer_timeout_ms) 0) (lt (int .Values.config.fanout_deadline_ms) (int .Values.config.peer_timeout_ms)) }}
{{- $messages = append $messages (printf "config.fanout_deadline_ms (%d) is shorter than config.peer_timeout_ms (%d), so no peer could ever answer in time: make fanout_deadline_ms at least peer_timeout_ms" (int .Values.config.fanout_deadline_ms) (int .Values.config.peer_timeout_ms)) }}
{{- end }}
{{- $commit := int (.Values.config.commit_timeout_ms | default 2000) }}
{{- $request := int (.Values.config.request_timeout_ms | default 10000) }}
{{- if ge $commit $request }}
{{- $messages = append $messages (printf "config.commit_timeout_ms (%d) must be below config.request_timeout_ms (%d), or a visit can time out as 408 and still be committed afterwards: lower commit_timeout_ms or raise request_timeout_ms" $commit $request) }}
{{- end }}
{{- if and .Values.service.nodePort (eq .Values.service.type "ClusterIP") }}
{{- $messages = append $messages (printf "service.nodePort (%v) is set but service.type is ClusterIP: set service.type to NodePort or LoadBalancer, or remove service.nodePort" .Values.service.nodePort) }}
{{- end }}
{{- if and .Values.pdb.create .Values.pdb.minAvailable .Values.pdb.maxUnavailable }}
{{- $messages = append $messages "pdb.minAvailable and pdb.maxUnavailable are both set: a PodDisruptionBudget takes only one, so empty one of them" }}
{{- end }}
{{- if and .Values.auth.enabled .Values.auth.existingSecret .Values.auth.token }}
{{- $messages = append $messages (printf "auth.token is set but auth.existingSecret (%s) is used instead: remove auth.token, or empty auth.existingSecret to have the chart create the Secret" .Values.auth.existingSecret) }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- $messages = append $messages "ingress.enabled is true but ingress.hosts is empty: add at least one host" }}
{{- end }}
{{- if and (eq .Values.updateStrategy.type "RollingUpdate") (gt (int .Values.updateStrategy.rollingUpdate.partition) (int .Values.replicaCount)) }}
{{- $messages = append $messages (printf "updateStrategy.rollingUpdate.partition (%d) is larger than replicaCount (%d), so no pod would ever be updated: use a partition between 0 and replicaCount" (int .Values.updateStrategy.rollingUpdate.partition) (int .Values.replicaCount)) }}
{{- end }}
{{- if $messages }}
{{- fail (printf "\n\nVALUES VALIDATION:\n- %s\n" (join "\n- " $messages)) }}
{{- end }}
{{- end }}

{{/*
The live StatefulSet of this release, or an empty dict: lookup finds nothing
under `helm template`, `--dry-run` without a cluster, or Argo CD. Kept on its
own line so scripts/check-chart can stand a rendered StatefulSet in for it.
*/}}
{{- define "tally.liveStatefulSet" -}}
{{- lookup "apps/v1" "StatefulSet" .Release.Namespace (include "tally.fullname" .) | toYaml }}
{{- end }}

{{/*
A Kubernetes quantity in bytes when it is a whole number with a binary or
decimal suffix, else the quantity as written: the API server stores
quantities in canonical form (1024Mi reads back as 1Gi), so the upgrade
check compares amounts, not spellings.
*/}}
{{- define "tally.quantityBytes" -}}
{{- $q := toString . }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- if regexMatch "^[0-9]+(k|M|G|T|Ki|Mi|Gi|Ti)?$" $q }}
{{- $number := regexReplaceAll "[^0-9].*$" $q "" | int64 }}
{{- $unit := regexReplaceAll "^[0-9]+" $q "" }}
{{- mul $number (index $units $unit) }}
{{- else }}
{{- $q }}
{{- end }}
{{- end }}

{{/*
Refuses, before Kubernetes does ("spec: Forbidden: updates to statefulset
spec for fields other than ... are forbidden"), a change to a StatefulSet
field that cannot change, naming the value and what to do. Compares these
values with the live StatefulSet; renders nothing when there is none.
*/}}
{{- define "tally.validateUpgrade" -}}
{{- $live := include "tally.liveStatefulSet" . | fromYaml }}
{{- if and $live $live.spec }}
{{- $name := include "tally.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $orphan := printf "kubectl delete statefulset %s --namespace %s --cascade=orphan (the pods keep running and the claims data-%s-N stay), then run the helm upgrade again: the new StatefulSet adopts the pods and rolls them" $name $ns $name }}
{{- $messages := list }}
{{- $spec := $live.spec }}
{{- $headless := include "tally.headlessServiceName" . }}
{{- if ne ($spec.serviceName | default "") $headless }}
{{- $messages = append $messages (printf "the headless Service name (from fullnameOverride/nameOverride) would change the StatefulSet's serviceName from %q to %q, which Kubernetes does not allow: keep the old fullnameOverride/nameOverride, or install a new release and move the traffic (a new name means new pods and new claims)" ($spec.serviceName | default "") $headless) }}
{{- end }}
{{- if ne ($spec.podManagementPolicy | default "OrderedReady") .Values.podManagementPolicy }}
{{- $messages = append $messages (printf "podManagementPolicy would change from %s to %s, which Kubernetes does not allow on a StatefulSet: keep --set podManagementPolicy=%s, or %s" ($spec.podManagementPolicy | default "OrderedReady") .Values.podManagementPolicy ($spec.podManagementPolicy | default "OrderedReady") $orphan) }}
{{- end }}
{{- $liveLabels := dict }}
{{- if $spec.selector }}{{- $liveLabels = $spec.selector.matchLabels | default dict }}{{- end }}
{{- $labels := include "tally.selectorLabels" . | fromYaml }}
{{- if not (deepEqual $liveLabels $labels) }}
{{- $messages = append $messages (printf "the pod selector would change from %s to %s (nameOverride, or a chart with other selector labels), which Kubernetes does not allow: keep the old nameOverride, or %s" (toJson $liveLabels) (toJson $labels) $orphan) }}
{{- end }}
{{- $templates := $spec.volumeClaimTemplates | default list }}
{{- if and .Values.persistence.enabled (not $templates) }}
{{- $messages = append $messages (printf "persistence.enabled would turn on volumes for a StatefulSet created without them, which Kubernetes does not allow: %s (the emptyDir counts are lost either way)" $orphan) }}
{{- else if and (not .Values.persistence.enabled) $templates }}
{{- $messages = append $messages (printf "persistence.enabled=false would drop the volume claim template of a StatefulSet created with one, which Kubernetes does not allow (and the pods would count from an emptyDir): keep persistence.enabled=true") }}
{{- else if $templates }}
{{- $claim := (first $templates).spec | default dict }}
{{- $size := "" }}
{{- if and $claim.resources $claim.resources.requests }}{{- $size = toString $claim.resources.requests.storage }}{{- end }}
{{- if ne (include "tally.quantityBytes" $size) (include "tally.quantityBytes" .Values.persistence.size) }}
{{- $messages = append $messages (printf "persistence.size would change from %s to %s, but a StatefulSet's volume claim template cannot change: keep --set persistence.size=%s; to grow the volumes, resize each claim (kubectl patch pvc data-%s-N --namespace %s -p '{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"%s\"}}}}', with a StorageClass that allows volume expansion), then %s" $size (toString .Values.persistence.size) $size $name $ns (toString .Values.persistence.size) $orphan) }}
{{- end }}
{{- $class := "" }}
{{- if hasKey $claim "storageClassName" }}{{- $class = $claim.storageClassName | default "-" }}{{- end }}
{{- if ne $class (toString .Values.persistence.storageClass) }}
{{- $messages = append $messages (printf "persistence.storageClass would change from %q to %q, but a StatefulSet's volume claim template cannot change, and the existing claims keep their class: keep persistence.storageClass at %q, or install a new release on the new class" $class (toString .Values.persistence.storageClass) $class) }}
{{- end }}
{{- if not (deepEqual ($claim.accessModes | default list) .Values.persistence.accessModes) }}
{{- $messages = append $messages (printf "persistence.accessModes would change from %s to %s, but a StatefulSet's volume claim template cannot change: keep the old accessModes" (toJson $claim.accessModes) (toJson .Values.persistence.accessModes)) }}
{{- end }}
{{- end }}
{{- if $messages }}
{{- fail (printf "\n\nUPGRADE REFUSED: the StatefulSet %s/%s exists and these values change what Kubernetes cannot change on it (docs/upgrading.md):\n- %s\n" $ns $name (join "\n- " $messages)) }}
{{- end }}
{{- end }}
{{- end }}
