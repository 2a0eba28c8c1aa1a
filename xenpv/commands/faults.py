"""`xenpv faults`: the fault catalogue, concrete schedules, and offline history checks.

- `xenpv faults list [--json]`: every fault kind and built-in plan, one line each;
- `xenpv faults schedule PLAN [--seed N] [--json]`: the concrete schedule of a plan (a file or
  a built-in name) and its hash;
- `xenpv faults check HISTORY.jsonl [--json] [--report FILE]`: verify the history's digest
  chain, re-run every checker and give the verdict; exit 1 on a violation or an altered
  history;
- `xenpv faults run PLAN [--seed N] [--json] [--report FILE] [--history FILE] [--state-dir DIR]`:
  run the plan against a real cluster (`xenpv.faults.runner`), print the verdict table; exit 1
  on a violation;
- `xenpv faults swarm PLAN --seeds N [--jobs J] [--first-seed S] [--json]`: N seeds in sim mode,
  each with its own choice of fault families, one child process per seed; exit 1 if any failed;
- `xenpv faults shrink PLAN --seed N [--out DIR]`: the smallest plan (pinned faults) that still
  fails the same checker for that seed. See docs/faults.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from xenpv.errors import UsageError
from xenpv.faults import history as history_mod
from xenpv.faults import plan as plan_mod
from xenpv.faults import report, runner, schedule
from xenpv.faults.catalogue import KINDS
from xenpv.faults.checkers import check_all

MAX_LISTED = 20


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "faults", help="fault injection: list kinds and plans, show schedules, check histories"
    )
    verbs = parser.add_subparsers(dest="faults_command", metavar="VERB", required=True)

    p = verbs.add_parser("list", help="fault kinds and built-in plans, one line each")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=run_list)

    p = verbs.add_parser("schedule", help="the concrete schedule of a plan and its hash")
    p.add_argument("plan", metavar="PLAN", help="a plan file, or a built-in plan's name")
    p.add_argument("--seed", type=int, default=None, help="root seed (default: the plan's)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=run_schedule)

    p = verbs.add_parser("check", help="re-run the checkers over a saved history")
    p.add_argument("history", type=Path, metavar="HISTORY", help="a history .jsonl file")
    p.add_argument("--json", action="store_true", help="the verdict as JSON on stdout")
    p.add_argument("--report", type=Path, default=None, metavar="FILE", help="HTML timeline")
    p.set_defaults(run=run_check)

    p = verbs.add_parser("run", help="run a plan against a real cluster and check it")
    p.add_argument("plan", metavar="PLAN", help="a plan file, or a built-in plan's name")
    p.add_argument("--seed", type=int, default=None, help="root seed (default: the plan's)")
    p.add_argument("--json", action="store_true", help="a JSON verdict as the last stdout line")
    p.add_argument("--report", type=Path, default=None, metavar="FILE", help="HTML timeline")
    p.add_argument(
        "--history", type=Path, default=None, metavar="FILE", help="keep the history (.jsonl)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the cluster's state directory (default: a temporary one, removed at the end)",
    )
    p.add_argument(
        "--attach",
        default=None,
        metavar="XENSTORE",
        help="run against a running cluster (e.g. compose's) through its xenstored at "
        "unix:PATH (dom0's socket) instead of starting one; needs --history-dir",
    )
    p.add_argument(
        "--history-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --attach: a directory every domain process writes its history to "
        "(a volume they share)",
    )
    p.add_argument(
        "--mode",
        choices=("real", "sim"),
        default="real",
        help="real: one process per domain; sim: every domain in one deterministic, "
        "virtual-time run (docs/faults.md, Simulation)",
    )
    p.add_argument(
        "--check-determinism",
        action="store_true",
        help="(--mode sim) run the seed twice and compare the history hashes",
    )
    p.add_argument(
        "--swarm",
        action="store_true",
        help="(--mode sim) the seed also chooses which fault families are on, as "
        "`faults swarm` does",
    )
    p.set_defaults(run=run_run)

    p = verbs.add_parser("swarm", help="run many seeds of a plan in sim mode (swarm testing)")
    p.add_argument("plan", metavar="PLAN", help="a plan file, or a built-in plan's name")
    p.add_argument("--seeds", type=int, required=True, metavar="N", help="how many seeds")
    p.add_argument("--first-seed", type=int, default=1, metavar="S", help="the first seed (1)")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="seeds run at once (1)")
    p.add_argument(
        "--all-families",
        action="store_true",
        help="every seed runs every fault family of the plan (no swarm choice)",
    )
    p.add_argument(
        "--check-determinism",
        action="store_true",
        help="run each seed twice; a seed whose history hashes differ fails",
    )
    p.add_argument("--json", action="store_true", help="a JSON summary as the last stdout line")
    p.set_defaults(run=run_swarm)

    # What `faults swarm` runs in each of its children (not for users: no help line).
    p = verbs.add_parser("swarm-worker")
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--swarm", action="store_true")
    p.add_argument("--check-determinism", action="store_true")
    p.set_defaults(run=run_swarm_worker)

    p = verbs.add_parser("shrink", help="shrink a failing sim seed to a small plan")
    p.add_argument("plan", metavar="PLAN", help="a plan file, or a built-in plan's name")
    p.add_argument("--seed", type=int, required=True, metavar="N", help="the failing seed")
    p.add_argument(
        "--swarm", action="store_true", help="the seed failed under `faults swarm`'s choice"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("shrunk"),
        metavar="DIR",
        help="where the plan, its history and report go (default: ./shrunk)",
    )
    p.add_argument("--json", action="store_true", help="a JSON summary as the last stdout line")
    p.set_defaults(run=run_shrink)


def run_list(args: argparse.Namespace) -> int:
    plans = [(name, plan_mod.builtin(name).description) for name in plan_mod.builtin_names()]
    blocked = {name: runner.blocked_kinds(plan_mod.builtin(name)) for name, _ in plans}
    if args.json:
        out = {
            "kinds": [
                {
                    "kind": k.id,
                    "family": k.family.value,
                    "description": k.description,
                    "targets": [t.value for t in k.targets],
                    "params": [
                        {
                            "name": p.name,
                            "type": p.type.__name__,
                            "default": p.default,
                            "range": p.describe_range(),
                        }
                        for p in k.params
                    ],
                    "injector": k.injector,
                    "injectable": k.why_not is None,
                    "why_not": k.why_not,
                }
                for k in KINDS
            ],
            "plans": [
                {"name": n, "description": d, "runnable": not blocked[n], "blocked": blocked[n]}
                for n, d in plans
            ],
        }
        print(json.dumps(out, sort_keys=True))
        return 0
    width = max(len(k.id) for k in KINDS)
    for k in KINDS:
        note = f" [not injectable yet: {k.why_not}]" if k.why_not else ""
        targets = ",".join(t.value for t in k.targets)
        print(f"kind  {k.id:<{width}}  {targets:<22} {k.description}{note}")
    for name, description in plans:
        if blocked[name]:
            description += f" [cannot run yet: {', '.join(blocked[name])}]"
        print(f"plan  {name:<{width}}  {description}")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    plan = plan_mod.load_any(args.plan)
    if args.seed is not None and not 0 <= args.seed <= plan_mod.MAX_SEED:
        raise plan_mod.PlanError("--seed", f"must be between 0 and {plan_mod.MAX_SEED}")
    sched = schedule.build(plan, args.seed)
    if args.json:
        print(json.dumps({"schedule": sched.to_json(), "hash": sched.hash}, sort_keys=True))
        return 0
    print(
        f"plan {sched.plan}, seed {sched.seed}: {len(sched.faults)} fault(s) in "
        f"{sched.duration - sched.quiet:g} s, then {sched.quiet:g} s quiet"
    )
    for f in sched.faults:
        params = " ".join(f"{k}={v}" for k, v in f.params)
        trigger = (
            f" p={f.probability:g}"
            if f.probability is not None
            else f" count={f.count}"
            if f.count is not None
            else ""
        )
        print(
            f"  {f.id:<6} {f.start:9.3f} - {f.stop:9.3f}  {f.kind:<26} {f.target}"
            f"{trigger} {params}".rstrip()
        )
    for w in sched.workloads:
        print(f"  workload[{w.index}] {w.kind} on {', '.join(w.targets) or 'nothing'}")
    print(f"  unaffected guests: {', '.join(sched.unaffected) or 'none'}")
    print(f"schedule hash {sched.hash}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    hist = history_mod.read(args.history)
    violations = check_all(hist)
    hist_hash = history_mod.history_hash(hist.ops)
    unfinished = (
        None
        if hist.finished
        else f"{args.history}: no end line: the run stopped early, or lines were cut off the end"
    )
    if args.report is not None:
        args.report.write_text(report.render_html(hist, violations))
        print(f"xenpv: report written to {args.report}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not violations and unfinished is None,
                    "finished": hist.finished,
                    "plan": hist.schedule.plan,
                    "seed": hist.schedule.seed,
                    "schedule_hash": hist.schedule.hash,
                    "history_hash": hist_hash,
                    "operations": len(hist),
                    "violations": [v.to_json() for v in violations],
                },
                sort_keys=True,
            )
        )
    else:
        s = hist.schedule
        verdict = "PASS" if not violations else f"FAIL ({len(violations)} violation(s))"
        if unfinished is not None:
            verdict = f"FAIL (unfinished history, {len(violations)} violation(s))"
        print(f"{verdict}: plan {s.plan}, seed {s.seed}, {len(hist)} operations")
        print(f"schedule hash {s.hash}")
        print(f"history hash  {hist_hash}")
        for v in violations[:MAX_LISTED]:
            print(v.line())
        if len(violations) > MAX_LISTED:
            print(f"... and {len(violations) - MAX_LISTED} more")
        if unfinished is not None:
            print(unfinished)
        if violations:
            print(f"rerun: {report.rerun_command(hist)}")
    return 0 if not violations and unfinished is None else 1


def run_run(args: argparse.Namespace) -> int:
    import functools

    import trio

    from xenpv.toolstack import supervisor
    from xenpv.toolstack.progress import Progress
    from xenpv.toolstack.supervisor import Supervisor

    plan = plan_mod.load_any(args.plan)
    if args.seed is not None and not 0 <= args.seed <= plan_mod.MAX_SEED:
        raise plan_mod.PlanError("--seed", f"must be between 0 and {plan_mod.MAX_SEED}")
    if getattr(args, "swarm", False):
        if getattr(args, "mode", "real") != "sim":
            raise UsageError("--swarm needs --mode sim")
        from xenpv.sim.swarm import swarm_plan

        plan = swarm_plan(plan, plan.run.seed if args.seed is None else args.seed)
    attached = args.attach is not None
    if attached and args.history_dir is None:
        raise UsageError("--attach needs --history-dir DIR: a directory every domain writes to")
    if not attached and args.history_dir is not None:
        raise UsageError(
            "--history-dir goes with --attach (otherwise the run's state dir holds it)"
        )
    if attached and args.state_dir is not None:
        raise UsageError(
            "--state-dir and --attach exclude each other: an attached run starts nothing"
        )
    # Before starting anything:
    runner.check_injectable(schedule.build(plan, args.seed), attached=attached)
    history = args.history.resolve() if args.history is not None else None
    if getattr(args, "mode", "real") == "sim":
        if attached:
            raise UsageError("--attach and --mode sim exclude each other")
        return _run_sim(args, plan, history)
    if getattr(args, "check_determinism", False):
        raise plan_mod.PlanError("--check-determinism", "needs --mode sim")
    results: list[runner.RunResult] = []

    if attached:
        results.append(
            trio.run(
                functools.partial(
                    runner.attach_plan,
                    plan,
                    args.seed,
                    args.attach,
                    args.history_dir.resolve(),
                    history_path=history,
                    progress=Progress.for_terminal(quiet=args.json),
                )
            )
        )
        return _finish_run(args, results[0])

    async def main(sup: Supervisor, state_dir: Path) -> int:
        result = await runner.run_plan(
            plan,
            args.seed,
            state_dir,
            sup,
            history_path=history,
            progress=Progress.for_terminal(quiet=args.json),
            log_level=getattr(args, "log_level", "info") or "info",
        )
        results.append(result)
        return 0 if result.ok else 1

    if args.state_dir is not None:
        code = supervisor.run(
            functools.partial(main, state_dir=args.state_dir.resolve()), Supervisor()
        )
    else:
        code = supervisor.run_in_temp_dir("xenpv-faults-", main, Supervisor())
    if not results:
        return code
    return _finish_run(args, results[0])


def _finish_run(args: argparse.Namespace, result: runner.RunResult) -> int:
    if args.report is not None:
        args.report.write_text(report.render_html(result.history, result.violations))
        print(f"xenpv: report written to {args.report}", file=sys.stderr)
    _print_verdict(result)
    if args.json:
        print(runner.save_json(result))
    return 0 if result.ok else 1


def _run_sim(args: argparse.Namespace, plan: plan_mod.Plan, history: Path | None) -> int:
    import json

    from xenpv.sim import faults as sim_faults
    from xenpv.sim.kernel import term_as_interrupt, with_fixed_hash_seed

    if args.state_dir is not None:
        raise plan_mod.PlanError("--state-dir", "a simulated run keeps no state directory")
    sim_faults.check_simulable(schedule.build(plan, args.seed))
    with_fixed_hash_seed()
    term_as_interrupt()
    result, sim, digest = sim_faults.run_in_temp_dir(plan, args.seed, history)
    deterministic: bool | None = None
    if args.check_determinism:
        _again, _sim, digest_again = sim_faults.run_in_temp_dir(plan, args.seed)
        deterministic = digest_again == digest
    if args.report is not None:
        args.report.write_text(report.render_html(result.history, result.violations))
        print(f"xenpv: report written to {args.report}", file=sys.stderr)
    _print_verdict(result)
    print(
        f"simulated {sim.simulated_seconds:.1f} s in {sim.wall_seconds:.1f} s wall; "
        f"history hash {digest}"
    )
    if deterministic is not None:
        print("deterministic: " + ("yes" if deterministic else "NO, the rerun's history differs"))
    if getattr(args, "swarm", False):
        on = dict.fromkeys(f.kind.split(".")[0] for f in plan.faults)
        print(f"swarm: fault families on for this seed: {', '.join(on) or 'none'}")
    if args.json:
        out = json.loads(runner.save_json(result))
        out.update(mode="sim", history_hash=digest, deterministic=deterministic)
        if getattr(args, "swarm", False):
            out.update(families=list(dict.fromkeys(f.kind.split(".")[0] for f in plan.faults)))
        out.update(simulated_seconds=round(sim.simulated_seconds, 3))
        print(json.dumps(out, sort_keys=True))
    return 0 if result.ok and deterministic is not False else 1


def _print_verdict(result: runner.RunResult) -> None:
    s = result.schedule
    counts = result.per_checker()
    print(
        f"plan {s.plan}, seed {s.seed}: {result.faults_injected} fault(s) injected, "
        f"{result.ops} operations"
    )
    print(f"  {'checker':<10} {'violations':>10}  verdict")
    for name, n in counts.items():
        print(f"  {name:<10} {n:>10}  {'PASS' if n == 0 else 'FAIL'}")
    if not result.history.finished:
        print("  history unfinished: the run stopped early")
    for v in result.violations[:MAX_LISTED]:
        print(v.line())
    print(f"schedule hash {s.hash}")
    verdict = "PASS" if result.ok else "FAIL"
    print(f"{verdict}: plan {s.plan}, seed {s.seed}")


# -- swarm and shrink (sim mode; docs/faults.md, "Simulation") --------------------------------


def _seed_range(first: int, count: int) -> range:
    if count < 1:
        raise UsageError("--seeds must be at least 1")
    if first < 0 or first + count - 1 > plan_mod.MAX_SEED:
        raise plan_mod.PlanError("--first-seed", f"seeds must be between 0 and {plan_mod.MAX_SEED}")
    return range(first, first + count)


def _repro(plan_arg: str, seed: int, swarm: bool, check_determinism: bool = False) -> str:
    flags = (" --swarm" if swarm else "") + (" --check-determinism" if check_determinism else "")
    return f"xenpv faults run {plan_arg} --mode sim --seed {seed}{flags}"


async def _lines(stream: Any) -> AsyncIterator[bytes]:
    """The lines of a child's stdout (a trio ReceiveStream), without their newlines."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        yield line


def run_swarm(args: argparse.Namespace) -> int:
    import os
    import subprocess
    import time

    import trio

    from xenpv.sim import faults as sim_faults
    from xenpv.sim.kernel import HASH_SEED
    from xenpv.sim.swarm import chosen_families
    from xenpv.toolstack import supervisor
    from xenpv.toolstack.progress import Progress
    from xenpv.toolstack.supervisor import Supervisor

    plan = plan_mod.load_any(args.plan)
    seeds = _seed_range(args.first_seed, args.seeds)
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    full = schedule.build(plan, seeds[0])  # every family: refuse what the sim cannot inject
    runner.check_injectable(full)
    sim_faults.check_simulable(full)
    swarm = not args.all_families
    # Each worker is a child running seeds one after another (`faults swarm-worker`): a
    # built-in plan by name, a file by its absolute path.
    plan_spec = str(Path(args.plan).resolve()) if plan.base_dir is not None else args.plan
    progress = Progress.for_terminal(quiet=args.json)
    failed: dict[int, str] = {}  # seed -> what failed
    simulated: list[float] = []  # each seed's simulated seconds (once, if run twice)
    done = 0
    started = time.monotonic()
    todo = iter(seeds)

    def judge(record: dict[str, Any]) -> None:
        seed = int(record["seed"])
        if "error" in record:
            failed[seed] = f"error: {record['error']}"
            return
        simulated.append(float(record.get("simulated_seconds", 0.0)))
        bad = [name for name, n in record.get("checkers", {}).items() if n]
        if record.get("deterministic") is False:
            bad.append("nondeterministic")
        if bad or not record.get("ok"):
            failed[seed] = ", ".join(bad) or "unfinished history"

    async def worker(sup: Supervisor, state_dir: Path, index: int) -> None:
        nonlocal done
        log_path = state_dir / "logs" / f"worker-{index}.log"
        command = [sys.executable, "-m", "xenpv", "--log-level", "warning", "faults"]
        command += ["swarm-worker", plan_spec] + (["--swarm"] if swarm else [])
        command += ["--check-determinism"] if args.check_determinism else []
        # The sims' temporary directories live in ours: removed whatever happens.
        env = dict(os.environ, TMPDIR=str(state_dir), PYTHONHASHSEED=HASH_SEED)
        child = await sup.spawn(
            f"worker-{index}",
            "worker",
            command,
            log_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        proc = child.proc
        assert isinstance(proc, trio.Process) and proc.stdin and proc.stdout
        lines = _lines(proc.stdout)
        for seed in todo:  # shared by the workers: whoever is free takes the next seed
            await proc.stdin.send_all(b"%d\n" % seed)
            line = await anext(lines, None)
            if line is None:  # the worker died: this seed's error is its log's last line
                text = log_path.read_text(errors="replace") if log_path.exists() else ""
                last = (text.strip().splitlines() or ["no output"])[-1]
                failed[seed] = f"error, worker exit status {await proc.wait()}: {last}"
                done += 1
                return
            judge(json.loads(line))
            done += 1
            progress.show(f"swarm: {done}/{len(seeds)} seeds, {len(failed)} failed")
        await proc.stdin.aclose()
        await proc.wait()
        sup.forget(child)

    async def main(sup: Supervisor, state_dir: Path) -> int:
        (state_dir / "logs").mkdir(exist_ok=True)
        progress.show(f"swarm: 0/{len(seeds)} seeds")
        try:
            async with trio.open_nursery() as nursery:
                for index in range(min(args.jobs, len(seeds))):
                    nursery.start_soon(worker, sup, state_dir, index)
        finally:
            progress.close()
        return 1 if failed else 0

    code = supervisor.run_in_temp_dir("xenpv-swarm-", main, Supervisor())
    if code not in (0, 1):
        return code  # interrupted
    seconds = time.monotonic() - started
    rate = len(seeds) / seconds * 60 if seconds > 0 else 0.0
    runs = 2 if args.check_determinism else 1
    sim_rate = sum(simulated) * runs / seconds if seconds > 0 else 0.0
    checked = ", each run twice (determinism)" if args.check_determinism else ""
    print(f"swarm: plan {plan.name}, seeds {seeds[0]}..{seeds[-1]}, jobs {args.jobs}{checked}")
    print(
        f"  {'seeds':>6} {'passed':>6} {'failed':>6} {'seconds':>8} {'seeds/min':>9} "
        f"{'sim s/wall s':>12}"
    )
    print(
        f"  {len(seeds):>6} {len(seeds) - len(failed):>6} {len(failed):>6} "
        f"{seconds:>8.1f} {rate:>9.1f} {sim_rate:>12.2f}"
    )
    for seed in sorted(failed):
        families = ",".join(chosen_families(plan, seed) if swarm else ("all",))
        print(
            f"FAIL seed {seed} [{failed[seed]}] families {families}: "
            + _repro(args.plan, seed, swarm, args.check_determinism)
        )
    print("PASS" if not failed else f"FAIL: {len(failed)} of {len(seeds)} seeds")
    if args.json:
        out = {
            "plan": plan.name,
            "seeds": list(seeds),
            "passed": len(seeds) - len(failed),
            "failed": sorted(failed),
            "failures": {str(s): failed[s] for s in sorted(failed)},
            "repro": {
                str(s): _repro(args.plan, s, swarm, args.check_determinism) for s in sorted(failed)
            },
            "seconds": round(seconds, 3),
            "seeds_per_minute": round(rate, 2),
            "simulated_seconds_per_wall_second": round(sim_rate, 3),
            "check_determinism": args.check_determinism,
            "jobs": args.jobs,
        }
        print(json.dumps(out, sort_keys=True))
    return 1 if failed else 0


def run_swarm_worker(args: argparse.Namespace) -> int:
    """Seeds on stdin, one verdict record per stdout line (xenpv/sim/swarm.py)."""
    from xenpv.sim.kernel import with_fixed_hash_seed
    from xenpv.sim.swarm import serve_seeds

    with_fixed_hash_seed()  # the swarm sets it already: a no-op
    plan = plan_mod.load_any(args.plan)
    serve_seeds(plan, swarm=args.swarm, check_determinism=args.check_determinism)
    return 0


def run_shrink(args: argparse.Namespace) -> int:
    import shutil

    from xenpv.faults.shrink import Shrinker, ShrinkError, relocated, topology_source
    from xenpv.sim import faults as sim_faults
    from xenpv.sim.kernel import term_as_interrupt, with_fixed_hash_seed
    from xenpv.sim.swarm import swarm_plan

    plan = plan_mod.load_any(args.plan)
    seed = args.seed
    if not 0 <= seed <= plan_mod.MAX_SEED:
        raise plan_mod.PlanError("--seed", f"must be between 0 and {plan_mod.MAX_SEED}")
    if args.swarm:
        plan = swarm_plan(plan, seed)
    sched = schedule.build(plan, seed)
    runner.check_injectable(sched)
    sim_faults.check_simulable(sched)
    with_fixed_hash_seed()
    term_as_interrupt()
    first, _sim, _digest = sim_faults.run_in_temp_dir(plan, seed)
    if first.ok:
        raise ShrinkError(f"plan {plan.name}, seed {seed} passes in sim mode: nothing to shrink")
    if not first.violations:
        raise ShrinkError(f"seed {seed}: the run stopped early (unfinished history), no checker")
    checker = first.violations[0].checker
    print(
        f"seed {seed} fails {checker} with {len(sched.faults)} fault(s); shrinking", file=sys.stderr
    )
    source = topology_source(plan)

    def attempt(candidate: plan_mod.Plan) -> frozenset[str]:
        result, _sim, _digest = sim_faults.run_in_temp_dir(candidate, seed)
        return frozenset(v.checker for v in result.violations)

    shrinker = Shrinker(
        plan,
        sched,
        checker,
        attempt,
        "demo" if source is None else str(source),
        log=lambda line: print(f"xenpv: {line}", file=sys.stderr),
    )
    result = shrinker.run()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    text = result.text
    if source is not None:  # the plan names its topology next to it
        shutil.copyfile(source, out / source.name)
        text = relocated(text, source.name)
    plan_path = out / "plan.toml"
    plan_path.write_text(text)
    final, _sim, _digest = sim_faults.run_in_temp_dir(
        plan_mod.load(plan_path), seed, out / "history.jsonl"
    )
    (out / "report.html").write_text(report.render_html(final.history, final.violations))
    same = any(v.checker == checker for v in final.violations)
    before, after = result.before, result.after
    print(f"shrunk plan {plan.name}, seed {seed}, checker {checker} ({result.attempts} runs)")
    print(f"  faults    {len(before.faults)} -> {len(after.faults)}")
    print(f"  workloads {len(before.workloads)} -> {len(after.workloads)}")
    print(f"  duration  {before.duration:g} s -> {after.duration:g} s")
    for f in after.faults:
        print(f"  {f.start:9.3f} - {f.stop:9.3f}  {f.kind:<26} {f.target}")
    print(f"plan {plan_path}, history {out / 'history.jsonl'}, report {out / 'report.html'}")
    print(f"rerun: xenpv faults run {plan_path} --mode sim --seed {seed}")
    if not same:
        print(f"WARNING: the written plan's run did not fail {checker} again")
    if args.json:
        summary = {
            "plan": str(plan_path),
            "seed": seed,
            "checker": checker,
            "faults_before": len(before.faults),
            "faults_after": len(after.faults),
            "attempts": result.attempts,
            "fails_again": same,
        }
        print(json.dumps(summary, sort_keys=True))
    return 0 if same else 1
