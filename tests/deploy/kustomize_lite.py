"""A small, strict kustomize renderer for the subset deploy/k8s/ uses, so `make test` renders the
overlays with no kustomize binary and no network.

Supported, and nothing else (anything else raises ``Unsupported``, so an overlay that grows a
feature this file does not implement fails loudly instead of rendering wrong):

- ``resources``: YAML files and folders holding a kustomization.yaml (rendered recursively);
- ``patches`` with only ``path``: strategic-merge patches matched by apiVersion, kind and name.
  Maps merge recursively; ``null`` deletes a key; lists merge by key where Kubernetes declares a
  merge key (containers/initContainers/volumes/env/imagePullSecrets by ``name``, volumeMounts by
  ``mountPath``), are replaced where Kubernetes replaces them (args, command, tolerations), and
  any other list in a patch raises; ``$patch``-style directives raise;
- ``images``: ``name`` with ``newName`` / ``newTag`` / ``digest`` on pod-template containers.

Where `kubectl kustomize` (or `kustomize`) is installed, the tests compare this renderer's output
with it, document for document.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "imagePullSecrets": "name", "volumeMounts": "mountPath"}
ATOMIC_LISTS = {"args", "command", "tolerations"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class Unsupported(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def resource_id(doc: dict) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


def build(folder: str | Path) -> list[dict]:
    """Render the kustomization in ``folder``; returns the documents in resource order."""
    folder = Path(folder)
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        raise Unsupported(f"{folder}: no kustomization.yaml (other file names are not implemented)")
    spec = yaml.safe_load(kfile.read_text()) or {}
    extra = set(spec) - KUSTOMIZATION_KEYS
    if extra:
        raise Unsupported(f"{kfile}: fields {sorted(extra)} are not implemented by kustomize_lite")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            docs += build(path)
        elif path.is_file():
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise FileNotFoundError(f"{kfile}: resource {entry!r} does not exist")
    ids = [resource_id(d) for d in docs]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"{kfile}: duplicate resources {sorted(duplicates)}")
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"{kfile}: only `patches: - path: FILE` is implemented, got {patch}")
        for pdoc in yaml.safe_load_all((folder / patch["path"]).read_text()):
            if not pdoc:
                continue
            targets = [i for i, d in enumerate(docs) if resource_id(d) == resource_id(pdoc)]
            if len(targets) != 1:
                raise ValueError(f"{kfile}: patch {patch['path']} matches no resource {resource_id(pdoc)}")
            docs[targets[0]] = strategic_merge(docs[targets[0]], pdoc)
    for image in spec.get("images", []):
        _set_image(docs, image, kfile)
    return docs


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge of ``patch`` onto ``base`` for the supported subset (a new value)."""
    if isinstance(patch, dict):
        directives = [k for k in patch if str(k).startswith("$")]
        if directives:
            raise Unsupported(f"strategic-merge directives {directives} are not implemented")
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(out.get(key), value, key)
        return out
    if isinstance(patch, list):
        if field in ATOMIC_LISTS:
            return copy.deepcopy(patch)
        if field not in MERGE_KEYS:
            raise Unsupported(f"list field {field!r} is neither keyed nor atomic in kustomize_lite")
        key = MERGE_KEYS[field]
        out = copy.deepcopy(base or [])
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise Unsupported(f"{field}: every patch item needs its merge key {key!r}")
            match = [i for i, old in enumerate(out) if old.get(key) == item[key]]
            if match:
                out[match[0]] = strategic_merge(out[match[0]], item, field)
            else:
                out.append(copy.deepcopy(item))
        return out
    return patch


def _set_image(docs: list[dict], image: dict, kfile: Path) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise Unsupported(f"{kfile}: image fields {sorted(set(image))} not implemented")
    hits = 0
    for doc in docs:
        if doc["kind"] not in POD_TEMPLATE_KINDS:
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, tag = _split_image(container["image"])
            if name != image["name"]:
                continue
            hits += 1
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                new_tag = image.get("newTag", tag)
                container["image"] = f"{name}:{new_tag}" if new_tag else name
    if not hits:
        raise ValueError(f"{kfile}: image {image['name']!r} is used by no container")


def _split_image(ref: str) -> tuple[str, str | None]:
    """``registry:5000/a/b:tag`` -> (``registry:5000/a/b``, ``tag``); digests are not supported."""
    if "@" in ref:
        raise Unsupported(f"image {ref!r}: digests in resources are not implemented")
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return ref, None
