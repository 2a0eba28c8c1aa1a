"""Kubernetes manifests for a topology (`xenpv k8s render`, docs/k8s.md): `render` turns a
topology into plain dicts (pure), `yamlout` writes them."""
