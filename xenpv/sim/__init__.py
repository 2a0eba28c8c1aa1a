"""Deterministic simulation: run trio code on a virtual clock with seeded scheduling.

See docs/faults.md ("Simulation") for what is simulated today and what is not yet.
"""
