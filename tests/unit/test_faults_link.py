"""LinkInjector: the Verdicts it gives the domain-link seam."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.unit.faults_helpers import Clock, fault
from xenpv.faults.injectors import Injection, NoInjector, injected
from xenpv.faults.link import LinkInjector
from xenpv.faults.schedule import ScheduledFault
from xenpv.hv.faults import LinkFaults, Verdict
from xenpv.hv.messages import Event, MapRequest

DOMIDS = {"backend": 1, "guest4k": 2, "guest16k": 3}
LINK = "link:backend-guest4k"
BE, G4, G16 = 1, 2, 3


def _injector(**kw: Any) -> LinkInjector:
    return LinkInjector(DOMIDS, seed=1, **kw)


def _with(f: ScheduledFault, **changes: Any) -> ScheduledFault:
    fields = {
        "id": f.id,
        "spec": f.spec,
        "kind": f.kind,
        "target": f.target,
        "start": f.start,
        "stop": f.stop,
        "probability": f.probability,
        "count": f.count,
        "params": f.params,
    }
    fields.update(changes)
    return ScheduledFault(**fields)


def test_it_is_a_link_faults_seam_and_passes_when_idle() -> None:
    inj = _injector()
    seam: LinkFaults = inj
    assert seam.on_send(BE, G4, ["msg"]) is None


def test_loss_duplicate_and_scope() -> None:
    inj = _injector()
    with injected(inj, fault("link.loss", LINK)):
        # A reliable link cannot lose one message: it fails (docs/faults.md, "Link faults").
        for src, dst in ((BE, G4), (G4, BE)):
            verdict = inj.on_send(src, dst, ["m"])
            assert verdict is not None and verdict.fail and "lost" in verdict.fail
        assert inj.on_send(BE, G16, ["m"]) is None  # another link
    assert inj.on_send(BE, G4, ["m"]) is None  # healed on leaving the block
    event = Event(3)
    with injected(inj, fault("link.duplicate", "domain:guest16k")):
        assert inj.on_send(G16, BE, event) == Verdict(send=[event, event], delay=0.0)
        assert inj.on_send(BE, G4, event) is None
        # A request is carried out once: a reliable receiver drops a retransmitted copy.
        assert inj.on_send(G16, BE, MapRequest(7, [1], readonly=False)) is None


def test_partition_one_way_drop_and_fail() -> None:
    inj = _injector()
    one_way = fault("link.partition", LINK, direction="one-way", mode="drop")
    inj.start(one_way)
    verdict = inj.on_send(BE, G4, ["m"])
    assert verdict is not None and verdict.fail and "partition" in verdict.fail
    assert inj.on_send(G4, BE, ["m"]) is None
    inj.stop(one_way)
    inj.start(fault("link.partition", LINK, "f1.0", direction="both", mode="fail"))
    verdict = inj.on_send(G4, BE, ["m"])
    assert verdict is not None and verdict.fail and "partition" in verdict.fail


def test_probability_and_count_are_seeded() -> None:
    def run(seed: int) -> list[bool]:
        inj = LinkInjector(DOMIDS, seed=seed)
        inj.start(_with(fault("link.loss", LINK), probability=0.5))
        return [inj.on_send(BE, G4, [i]) is not None for i in range(64)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert 10 < sum(run(3)) < 54
    inj = _injector()
    inj.start(_with(fault("link.loss", LINK), count=2))
    dropped = [inj.on_send(BE, G4, [i]) is not None for i in range(5)]
    assert dropped == [True, True, False, False, False]


def test_delay_with_jitter() -> None:
    inj = _injector()
    inj.start(fault("link.delay", LINK, delay=0.01, jitter=0.005))
    delays = []
    for i in range(20):
        v = inj.on_send(BE, G4, [i])
        assert v is not None and v.send == [[i]]
        delays.append(v.delay)
    assert all(0.01 <= d <= 0.015 for d in delays)
    assert len(set(delays)) > 1


def test_reorder_holds_and_releases_after_later_messages() -> None:
    inj = _injector()
    f = _with(fault("link.reorder", LINK, hold=2), count=1)
    inj.start(f)
    sent: list[Any] = []
    for i in range(4):
        v = inj.on_send(BE, G4, [i])
        sent += [[i]] if v is None else list(v.send)
    assert sent == [[1], [2], [0], [3]]
    # A message held when the fault stops leaves with the next message.
    inj.start(_with(f, id="f1.0"))
    v = inj.on_send(BE, G4, ["late"])
    assert v is not None and v.send == []
    inj.stop(_with(f, id="f1.0"))
    inj.stop(f)
    v = inj.on_send(BE, G4, ["next"])
    assert v is not None and list(v.send) == [["next"], ["late"]]


def test_bandwidth_token_bucket() -> None:
    clock = Clock()
    inj = _injector(clock=clock, size_of=lambda m: 1000)
    inj.start(fault("link.bandwidth", LINK, rate=10_000.0, burst=2000.0))
    assert inj.on_send(BE, G4, [0]) is None  # within the burst: unchanged
    assert inj.on_send(BE, G4, [1]) is None
    v = inj.on_send(BE, G4, [2])
    assert v is not None and v.delay == pytest.approx(0.1)  # 1000 bytes at 10 kB/s
    v = inj.on_send(BE, G4, [3])
    assert v is not None and v.delay == pytest.approx(0.2)  # after the previous one
    clock.tick(1.0)  # the bucket refills (to its burst)
    assert inj.on_send(BE, G4, [4]) is None


def test_corrupt_uses_the_corrupter_or_fails_the_link() -> None:
    inj = _injector()
    inj.start(fault("link.corrupt", LINK))
    verdict = inj.on_send(BE, G4, ["m"])
    assert verdict is not None and verdict.fail and "corrupt" in verdict.fail

    def flip(message: list[Any], rng: random.Random) -> list[Any]:
        return [*message, "flipped"]

    inj = _injector(corrupter=flip)
    inj.start(fault("link.corrupt", LINK))
    v = inj.on_send(BE, G4, ["m"])
    assert v is not None and v.send == [["m", "flipped"]]


def test_injection_heals_everything_on_error_and_records_it() -> None:
    from tests.unit.faults_helpers import Recorder

    rec = Recorder()
    inj = _injector()
    with pytest.raises(RuntimeError), Injection([inj], rec.writer) as injection:
        injection.start(fault("link.loss", LINK))
        injection.start(fault("link.duplicate", LINK, "f1.0"))
        raise RuntimeError("the run failed")
    assert inj.active == []
    fs = [line for line in rec.text.splitlines() if '"fault-' in line]
    assert len(fs) == 4 and '"fault-stop"' in fs[-1]
    with pytest.raises(NoInjector, match=r"storage\.eio"):
        Injection([inj]).check([fault("storage.eio", "device:guest4k:vbd:xvda")])
    with pytest.raises(NoInjector, match=r"grant\.revoke-while-mapped.*xenpv\.faults\.agent"):
        Injection([inj]).check([fault("grant.revoke-while-mapped", "device:guest4k:vbd:xvda")])


async def test_follow_starts_and_stops_on_schedule(autojump_clock: object) -> None:
    import trio

    from tests.unit.faults_helpers import Recorder, quiet_schedule
    from xenpv.faults.injectors import follow

    sched = quiet_schedule(
        '[[fault]]\nkind = "link.loss"\ntarget = "link:backend-guest4k"\nat = 2.0\n'
        "duration = 3.0\nevery = 6.0\n"
    )
    inj = LinkInjector({"backend": 1, "guest4k": 2}, seed=1)
    rec = Recorder(sched)
    seen: list[tuple[float, int]] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            with Injection([inj], rec.writer) as injection:
                nursery.start_soon(follow, sched, injection)
                await trio.sleep(0.5)  # sample between events, never at one
                for _ in range(20):
                    await trio.sleep(1.0)
                    seen.append((trio.current_time(), len(inj.active)))
    active_at = dict(seen)
    assert [active_at[t] for t in (1.5, 3.5, 5.5, 8.5, 11.5, 14.5)] == [0, 1, 0, 1, 0, 1]
    starts = rec.text.count('"fault-start"')
    assert starts == len(sched.faults) == rec.text.count('"fault-stop"')


async def test_cancelling_follow_heals_what_it_started(autojump_clock: object) -> None:
    import trio

    from tests.unit.faults_helpers import quiet_schedule
    from xenpv.faults.injectors import follow

    sched = quiet_schedule(
        '[[fault]]\nkind = "link.loss"\ntarget = "link:backend-guest4k"\nat = 1.0\n'
        "duration = 10.0\n"
    )
    inj = LinkInjector({"backend": 1, "guest4k": 2}, seed=1)
    with trio.fail_after(60):
        with Injection([inj]) as injection, trio.move_on_after(5.0):
            await follow(sched, injection)
        assert inj.active == []
