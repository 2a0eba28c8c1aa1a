"""Fault injection: plans, seeded schedules, histories, checkers, reports and injectors.

- `catalogue`: every fault kind as data (family, parameters, targets);
- `plan`: the plan TOML and its validation; built-in plans live in `plans/*.toml`;
- `targets`: target selectors and what a topology offers;
- `schedule`: (plan, seed, topology) → concrete faults, with a hash;
- `history`: the JSONL history with a chained digest; `tags`: payload tags;
- `checkers`: linear-time checkers over a history; `report`: the HTML timeline;
- `injectors`: the `Injector` interface and its healing context managers;
  `link`: a `LinkFaults` for domain links; `storage`: `FaultyStorage`.

See docs/faults.md.
"""
