"""The toolstack (dom0): topology files, domain and device creation in xenstore, the local
launcher and the cluster's status. See docs/architecture.md for the layers."""
