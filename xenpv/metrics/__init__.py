"""Operation counters: what the PV protocol costs, counted where the work is done.

counters.py: the `@dataclass(slots=True)` records the hypervisor, rings and xenstored
increment in place; registry.py: the process-wide list of them and `snapshot()`, the one read
side (a nested plain dict); prometheus.py: the exposition of a snapshot at scrape time.
See docs/metrics.md.
"""
