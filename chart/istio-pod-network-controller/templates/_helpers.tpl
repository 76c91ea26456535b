{{/*
Names. The fullname does not include the release name: there is one agent per cluster, and
`helm template` without a release name would otherwise prefix everything with "release-name".
*/}}
{{- define "ipnc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ipnc.fullname" -}}
{{- default (include "ipnc.name" .) .Values.fullnameOverride | trunc 55 | trimSuffix "-" -}}
{{- end -}}

{{- define "ipnc.agent.name" -}}
{{- printf "%s-agent" (include "ipnc.fullname" .) -}}
{{- end -}}

{{- define "ipnc.webhook.name" -}}
{{- printf "%s-webhook" (include "ipnc.fullname" .) -}}
{{- end -}}

{{- define "ipnc.webhook.tlsSecret" -}}
{{- printf "%s-webhook-tls" (include "ipnc.fullname" .) -}}
{{- end -}}

{{- define "ipnc.openshift" -}}
{{- if eq .Values.kubernetesDistribution "OpenShift" -}}true{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "ipnc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ipnc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: istio-pod-network-controller
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Selector labels of one component: (dict "ctx" $ "component" "agent"). Without the release name:
selectors cannot change, and `helm template` (release "release-name") followed later by
`helm install NAME` must still apply over the same objects.
*/}}
{{- define "ipnc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ipnc.name" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ipnc.componentLabels" -}}
{{ include "ipnc.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference from {repository, tag, digest}; the tag defaults to the appVersion. */}}
{{- define "ipnc.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "ipnc.image" -}}
{{- include "ipnc.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* The waiter's image: the chart's image unless waiter.image.repository is set. */}}
{{- define "ipnc.waiterImage" -}}
{{- if .Values.waiter.image.repository -}}
{{- include "ipnc.imageRef" (dict "image" .Values.waiter.image "appVersion" .Chart.AppVersion) -}}
{{- else -}}
{{- include "ipnc.image" . -}}
{{- end -}}
{{- end -}}

{{/* The excluded namespaces, the release's own included, comma-separated. */}}
{{- define "ipnc.excludedNamespaces" -}}
{{- append .Values.excludedNamespaces .Release.Namespace | uniq | join "," -}}
{{- end -}}

{{/*
The webhook's TLS material when the chart makes it (cert-manager off): a dict with caCert,
tlsCert, tlsKey. helm install/upgrade reuse the Secret already in the cluster (so an upgrade does not
change the caBundle under running pods); otherwise a new CA and serving certificate are generated
with helm's genCA/genSignedCert. Computed once per render and kept, so that the Secret, the
caBundle and the Deployment's checksum all see the same certificate.
*/}}
{{- define "ipnc.webhook.tls" -}}
{{- $memo := index .Values "__ipncWebhookTLS" | default dict -}}
{{- if not $memo.tlsCert -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "ipnc.webhook.tlsSecret" .) -}}
{{- $data := (get (default dict $secret) "data") | default dict -}}
{{- if and (index $data "ca.crt") (index $data "tls.crt") (index $data "tls.key") -}}
{{- $_ := set $memo "caCert" (index $data "ca.crt" | b64dec) -}}
{{- $_ := set $memo "tlsCert" (index $data "tls.crt" | b64dec) -}}
{{- $_ := set $memo "tlsKey" (index $data "tls.key" | b64dec) -}}
{{- else -}}
{{- $svc := include "ipnc.webhook.name" . -}}
{{- $ns := .Release.Namespace -}}
{{- $days := int .Values.webhook.certificate.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "ipnc.fullname" .)) $days -}}
{{- $dns := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" $svc $ns) nil $dns $days $ca -}}
{{- $_ := set $memo "caCert" $ca.Cert -}}
{{- $_ := set $memo "tlsCert" $cert.Cert -}}
{{- $_ := set $memo "tlsKey" $cert.Key -}}
{{- end -}}
{{- $_ := set .Values "__ipncWebhookTLS" $memo -}}
{{- end -}}
{{- toJson $memo -}}
{{- end -}}
