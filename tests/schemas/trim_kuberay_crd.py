"""Rebuild ``kuberay_crd_v1.json`` from KubeRay's CRD files (run by hand when KubeRay is upgraded).

    python tests/schemas/trim_kuberay_crd.py KUBERAY_CHECKOUT v1.7.0 COMMIT

Keeps the ``openAPIV3Schema`` of the ``v1`` version of ``ray.io_rayclusters.yaml`` and ``ray.io_rayjobs.yaml``
(ray-operator/config/crd/bases/, Apache-2.0), without ``description`` texts and the ``status`` subtree (never
written by a user). Subtrees that repeat (the pod template appears 5 times, a container 9 times) are stored once
under ``$defs`` and referenced; the script checks that expanding the references gives back the schemas exactly.
Types, ``required``, enums, patterns, formats and the ``x-kubernetes-*`` extensions are kept as they are.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

MIN_SHARED_CHARS = 1500
WRAPPERS = ("properties", "items", "additionalProperties")


def v1_schema(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return schema


def strip_descriptions(node: object) -> object:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def subtrees(node: object, path: tuple = ()):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from subtrees(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from subtrees(value, (*path, i))


def def_name(path: tuple, taken: dict) -> str:
    words = [str(p) for p in path if p not in WRAPPERS and not isinstance(p, int)]
    base = words[-1] if words else "node"
    if path and path[-1] == "items":
        base += "Item"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    return name


def share_repeats(roots: dict) -> dict:
    """Move every subtree that occurs twice or more (largest first) into ``$defs`` and reference it."""
    defs: dict = {}
    while True:
        counts, first_path = Counter(), {}
        for root_name, root in [*roots.items(), *(("$defs/" + k, v) for k, v in defs.items())]:
            for path, node in subtrees(root):
                if not path or "$ref" in node:
                    continue
                text = json.dumps(node, sort_keys=True)
                if len(text) >= MIN_SHARED_CHARS:
                    counts[text] += 1
                    first_path.setdefault(text, path)
        repeated = [(len(t) * (n - 1), t) for t, n in counts.items() if n > 1]
        if not repeated:
            return defs
        _, text = max(repeated)
        name = def_name(first_path[text], defs)
        defs[name] = json.loads(text)
        ref = {"$ref": f"#/$defs/{name}"}
        for root in [*roots.values(), *(v for k, v in defs.items() if k != name)]:
            replace_subtree(root, text, ref)


def replace_subtree(node: object, text: str, ref: dict) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if isinstance(value, dict) and json.dumps(value, sort_keys=True) == text:
            node[key] = dict(ref)
        else:
            replace_subtree(value, text, ref)


def expand(node: object, defs: dict) -> object:
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return expand(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        return {k: expand(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, defs) for v in node]
    return node


def main(checkout: str, tag: str, commit: str) -> None:
    bases = Path(checkout) / "ray-operator/config/crd/bases"
    originals = {"RayCluster": v1_schema(bases / "ray.io_rayclusters.yaml"), "RayJob": v1_schema(bases / "ray.io_rayjobs.yaml")}
    roots = copy.deepcopy(originals)
    defs = share_repeats(roots)
    for kind, original in originals.items():
        assert expand(roots[kind], defs) == original, f"{kind}: shared subtrees do not expand back to the CRD's schema"
    document = {
        "source": f"github.com/ray-project/kuberay {tag} ({commit}) ray-operator/config/crd/bases/ray.io_rayclusters.yaml, "
                  "ray.io_rayjobs.yaml: openAPIV3Schema of version v1, descriptions and status removed, repeats in $defs; "
                  "Apache-2.0. Rebuilt by tests/schemas/trim_kuberay_crd.py.",
        **roots,
        "$defs": defs,
    }
    out = Path(__file__).with_name("kuberay_crd_v1.json")
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{out}: {out.stat().st_size} bytes, {len(defs)} shared subtrees")


if __name__ == "__main__":
    main(*sys.argv[1:4])
