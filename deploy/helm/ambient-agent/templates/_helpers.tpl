{{/*
Names are fixed, not derived from the release name: the product is one per cluster (it owns node-level
capture and the signer ambient-agent.dev/spiffe), and the processes and manifests/rbac-*.yaml use
these names. Labels are the ones manifests/rbac-*.yaml use.
*/}}

{{- define "ambient-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels of a component's objects, e.g. include "ambient-agent.labels" "node". */}}
{{- define "ambient-agent.labels" -}}
app.kubernetes.io/name: ambient-agent
app.kubernetes.io/component: {{ . }}
{{- end -}}

{{/* Who and where this pod is, from the downward API. */}}
{{- define "ambient-agent.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_UID
  valueFrom:
    fieldRef:
      fieldPath: metadata.uid
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end -}}

{{/*
The service-account token as a projected volume: bound to the pod (the CA checks that binding),
short-lived and rotated by the kubelet, whatever the cluster's automount defaults are.
*/}}
{{- define "ambient-agent.apiAccessVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 420
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end -}}

{{- define "ambient-agent.apiAccessMount" -}}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}

{{/*
The node agent's container security context: uid 0 because Kubernetes grants added capabilities only
to root, and then nothing but NET_ADMIN (nftables, ip rules, routes, IP_TRANSPARENT) and NET_RAW.
*/}}
{{- define "ambient-agent.nodeSecurityContext" -}}
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
  add: [NET_ADMIN, NET_RAW]
{{- end -}}

{{/* Every other container: the image's unprivileged user, no capabilities. */}}
{{- define "ambient-agent.restrictedSecurityContext" -}}
runAsUser: 65532
runAsGroup: 65532
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
