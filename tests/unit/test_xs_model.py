"""The Store against the reference model (tests/unit/xs_model.py), in-process."""

from __future__ import annotations

from hypothesis import settings

from tests.unit.xs_model import StoreDriver, make_machine

StoreMachine = make_machine(StoreDriver)
StoreMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
TestStoreMatchesModel = StoreMachine.TestCase
