#!/usr/bin/env python3
"""Writes manifests/ from the Helm chart: the plain-YAML install, equal to the chart's default render.

Renders deploy/helm/ambient-agent with Helm's own template engine (the `helm-python-sdk` dev
dependency binds the Helm SDK as a library, so no helm binary is needed) with the default values,
release `ambient-agent`, namespace `ambient-system`, and leaves out hooks (helm tests, the uninstall
hook), as `helm template ambient-agent deploy/helm/ambient-agent -n ambient-system --no-hooks` does.
It writes `manifests/ambient-agent.yaml`: the Namespace (which `helm install --create-namespace`
makes) and the render of every template except `templates/rbac-*.yaml`, whose objects live in the
hand-written `manifests/rbac-*.yaml` of the same name (the chart mirrors those). CRDs are not rendered:
`manifests/crds/` and the chart's `crds/` hold the same files.

Usage: `.venv/bin/python scripts/render-manifests.py` (or `make manifests`). tests/unit/test_manifests.py
fails when manifests/ and the chart disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "ambient-agent"
MANIFESTS = REPO / "manifests"
RELEASE = "ambient-agent"
NAMESPACE = "ambient-system"
MAIN_FILE = "ambient-agent.yaml"

# The node agent needs hostNetwork and NET_ADMIN: under Pod Security Admission only "privileged" admits it.
NAMESPACE_DOCUMENT = f"""apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    app.kubernetes.io/name: ambient-agent
    pod-security.kubernetes.io/enforce: privileged
"""

HEADER = """# Generated from deploy/helm/ambient-agent by scripts/render-manifests.py (`make manifests`): the
# chart's default render (release ambient-agent, namespace ambient-system, no hooks). Do not edit;
# change the chart and regenerate. Install: kubectl apply -f manifests/crds/ -f manifests/
"""

Document = dict[str, Any]


def render_templates(values: dict[str, Any] | None = None) -> dict[str, str]:
    """The rendered text of each manifest template, by file name relative to `templates/`."""
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        prefix = f"{chart.name}/templates/"
    return {
        path.removeprefix(prefix): text
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml") and not Path(path).name.startswith("_")
    }


def split_documents(text: str) -> list[str]:
    """The YAML documents of `text`, each as its own text; empty ones are dropped."""
    documents: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if line.rstrip() == "---":
            documents.append([])
        else:
            documents[-1].append(line)
    texts = ["".join(lines).strip("\n") + "\n" for lines in documents]
    return [text for text in texts if yaml.safe_load(text) is not None]


def render_objects(values: dict[str, Any] | None = None) -> list[Document]:
    """Every object the chart renders with `values`, hooks included, parsed."""
    return [
        yaml.safe_load(document)
        for text in render_templates(values).values()
        for document in split_documents(text)
    ]


def is_hook(obj: Document) -> bool:
    """Whether `obj` is a Helm hook (a test or the uninstall hook), which manifests/ leaves out."""
    return "helm.sh/hook" in (obj.get("metadata", {}).get("annotations") or {})


def manifest_files(values: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """What manifests/ holds for the chart rendered with `values`: file name -> document texts."""
    files: dict[str, list[str]] = {MAIN_FILE: [NAMESPACE_DOCUMENT]}
    for template, text in render_templates(values).items():
        documents = [document for document in split_documents(text) if not is_hook(yaml.safe_load(document))]
        if documents:
            target = template if template.startswith("rbac-") else MAIN_FILE
            files.setdefault(target, []).extend(documents)
    return files


def main() -> int:
    documents = manifest_files()[MAIN_FILE]
    path = MANIFESTS / MAIN_FILE
    path.write_text(HEADER + "".join(f"---\n{document}" for document in documents))
    print(f"wrote {path.relative_to(REPO)} ({len(documents)} objects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
