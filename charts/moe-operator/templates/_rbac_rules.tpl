{{/*
The operator's RBAC rules: the ONE place they are written. Keep them equal to the API calls the
operator makes (its tests record them). No wildcards, no Secrets.

Renders a YAML map:
  clusterScoped: rules on cluster-scoped resources (always in a ClusterRole)
  namespaced:    rules on namespaced resources (a ClusterRole when watching all namespaces or
                 namespace patterns, else a Role in every watched namespace)
*/}}
{{- define "moe-operator.rbacRules" -}}
clusterScoped:
  # kopf scans and watches CRDs to find the resources its handlers serve.
  - apiGroups: ["apiextensions.k8s.io"]
    resources: ["customresourcedefinitions"]
    verbs: ["list", "watch"]
{{- if include "moe-operator.namespacePatterns" . }}
  # kopf resolves namespace patterns against the live namespace list.
  - apiGroups: [""]
    resources: ["namespaces"]
    verbs: ["list", "watch"]
{{- end }}
{{- if and .Values.peering.enabled (include "moe-operator.allNamespaces" .) }}
  # Cluster-wide kopf peering (--all-namespaces uses ClusterKopfPeering); the live-state
  # reader gets it to stay quiet while another operator is in charge.
  - apiGroups: ["kopf.dev"]
    resources: ["clusterkopfpeerings"]
    verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- if .Values.webhook.enabled }}
  # kopf manages the ValidatingWebhookConfiguration of its admission webhook.
  - apiGroups: ["admissionregistration.k8s.io"]
    resources: ["validatingwebhookconfigurations"]
    verbs: ["create", "patch"]
{{- end }}
namespaced:
  # The custom resource: handlers, finalizers and kopf's progress annotations.
  - apiGroups: ["serving.moeoperator.io"]
    resources: ["moedeployments"]
    verbs: ["get", "list", "watch", "patch"]
  - apiGroups: ["serving.moeoperator.io"]
    resources: ["moedeployments/status"]
    verbs: ["patch"]
  # Children carry ownerReferences with blockOwnerDeletion: true; the API server's
  # OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift and many hardened
  # clusters) then requires update on the owner's finalizers subresource, else every child
  # write is a 403. Nothing calls this subresource itself.
  - apiGroups: ["serving.moeoperator.io"]
    resources: ["moedeployments/finalizers"]
    verbs: ["update"]
  # Children the operator owns.
  - apiGroups: ["ray.io"]
    resources: ["rayservices"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  - apiGroups: [""]
    resources: ["services"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  - apiGroups: ["policy"]
    resources: ["poddisruptionbudgets"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  - apiGroups: ["networking.k8s.io"]
    resources: ["networkpolicies"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  # Kubernetes events about what the operator did (kopf posts core/v1 Events).
  - apiGroups: [""]
    resources: ["events"]
    verbs: ["create"]
{{- if and .Values.peering.enabled (not (include "moe-operator.allNamespaces" .)) }}
  # Namespaced kopf peering (--namespace uses KopfPeering in each watched namespace); the
  # live-state reader gets it to stay quiet while another operator is in charge.
  - apiGroups: ["kopf.dev"]
    resources: ["kopfpeerings"]
    verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
