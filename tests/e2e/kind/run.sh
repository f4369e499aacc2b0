#!/usr/bin/env bash
# `make e2e-kind`: the end-to-end scenarios on a real kind cluster, installed the way a user would.
#
# Creates a kind cluster (tests/e2e/kind/kind-config.yaml: 1 control plane, 2 workers), builds the
# image from the Dockerfile and loads it into the nodes, installs the Helm chart, waits for the node
# agents and the CA, runs tests/e2e/kind/ through the cluster's kubeconfig and `helm test`, uninstalls,
# checks that no node kept the agent's nftables table or ip rule, and deletes the cluster. On failure
# it first collects logs into $AMBIENT_KIND_ARTIFACTS. Skips (exit 0, saying why) when docker (with a
# reachable daemon), kind, helm or kubectl is missing.
# Environment: AMBIENT_KIND_CLUSTER (default ambient-agent-e2e), AMBIENT_KIND_NODE_IMAGE (kindest/node
# image; default: kind's own), AMBIENT_KIND_ARTIFACTS (default /tmp/ambient-agent-kind),
# AMBIENT_KIND_KEEP=1 keeps the cluster.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../../.." && pwd)
CLUSTER=${AMBIENT_KIND_CLUSTER:-ambient-agent-e2e}
ARTIFACTS=${AMBIENT_KIND_ARTIFACTS:-/tmp/ambient-agent-kind}
KUBECONFIG_FILE=$ARTIFACTS/kubeconfig
NAMESPACE=ambient-system
IMAGE_REPOSITORY=ambient-agent
IMAGE_TAG=e2e
VPY=$REPO/.venv/bin/python

log() { printf '[e2e-kind] %s\n' "$*" >&2; }
skip() {
  echo "e2e-kind: SKIPPED: $*"
  exit 0
}

command -v docker >/dev/null || skip "docker is not installed"
docker info >/dev/null 2>&1 || skip "the Docker daemon is not reachable ('docker info' fails)"
command -v kind >/dev/null || skip "kind is not installed (https://kind.sigs.k8s.io)"
command -v helm >/dev/null || skip "helm is not installed (https://helm.sh)"
command -v kubectl >/dev/null || skip "kubectl is not installed"

collect_logs() {
  log "collecting logs into $ARTIFACTS"
  kind export logs "$ARTIFACTS/kind-logs" --name "$CLUSTER" >/dev/null 2>&1 || true
  kubectl --kubeconfig "$KUBECONFIG_FILE" cluster-info dump --all-namespaces \
    --output-directory "$ARTIFACTS/cluster-info" >/dev/null 2>&1 || true
  kubectl --kubeconfig "$KUBECONFIG_FILE" -n "$NAMESPACE" logs --all-containers --prefix --tail=-1 \
    -l app.kubernetes.io/name=ambient-agent >"$ARTIFACTS/ambient-agent.log" 2>&1 || true
}

finish() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    collect_logs
    log "FAILED (exit $rc); logs in $ARTIFACTS"
  fi
  if [ "${AMBIENT_KIND_KEEP:-0}" = 1 ]; then
    log "keeping cluster $CLUSTER (kubeconfig $KUBECONFIG_FILE)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}

mkdir -p "$ARTIFACTS"
# A cluster of the same name left by an interrupted run would make `kind create` fail.
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
trap finish EXIT

log "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config "$REPO/tests/e2e/kind/kind-config.yaml" \
  --kubeconfig "$KUBECONFIG_FILE" --wait 180s ${AMBIENT_KIND_NODE_IMAGE:+--image "$AMBIENT_KIND_NODE_IMAGE"}
export KUBECONFIG=$KUBECONFIG_FILE

log "building $IMAGE_REPOSITORY:$IMAGE_TAG and loading it into the nodes"
docker build -t "$IMAGE_REPOSITORY:$IMAGE_TAG" "$REPO"
kind load docker-image "$IMAGE_REPOSITORY:$IMAGE_TAG" --name "$CLUSTER"

log "installing the chart"
kubectl create namespace "$NAMESPACE"
kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged
helm install ambient-agent "$REPO/deploy/helm/ambient-agent" --namespace "$NAMESPACE" \
  --set image.repository="$IMAGE_REPOSITORY" --set image.tag="$IMAGE_TAG" --set image.pullPolicy=Never \
  --wait --timeout 5m
kubectl -n "$NAMESPACE" rollout status daemonset/ambient-agent-node --timeout=180s
kubectl -n "$NAMESPACE" rollout status deployment/ambient-agent-ca --timeout=180s

log "running the scenarios"
AMBIENT_KIND_KUBECONFIG=$KUBECONFIG_FILE AMBIENT_KIND_IMAGE="$IMAGE_REPOSITORY:$IMAGE_TAG" \
  "$VPY" -m pytest -q -p no:cacheprovider "$REPO/tests/e2e/kind"
helm test ambient-agent --namespace "$NAMESPACE" --logs --timeout 5m

log "uninstalling; every node must be left without the agent's capture"
helm uninstall ambient-agent --namespace "$NAMESPACE" --wait --timeout 10m
left=0
for node in $(kind get nodes --name "$CLUSTER"); do
  if ! docker exec "$node" sh -c 'command -v nft' >/dev/null; then
    log "$node has no nft to look for the table with: use a newer AMBIENT_KIND_NODE_IMAGE"
    left=1
  elif docker exec "$node" nft list table inet ambient_agent >/dev/null 2>&1; then
    log "$node still has nftables table inet ambient_agent"
    left=1
  fi
  if docker exec "$node" ip rule show | grep -q 'fwmark 0x111/0xfff lookup 100'; then
    log "$node still has the agent's ip rule"
    left=1
  fi
done
[ "$left" = 0 ]
log "passed"
