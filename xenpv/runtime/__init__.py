"""A domain's runtime: the process that opens one emulated domain, finds its peers through
xenstore, serves its backends, attaches its frontends and runs its workloads. See
docs/architecture.md for the layers."""
