"""The floor: the throughput benchmark's experiments in ONE process, no Redis, no services.

The least CPU this work costs with this code. The same experiments as
``load_tests/experiment_throughput.py`` (its specs: ``experiment_specs``, i.e.
``services.cli.local.demo_settings``, the same seeds, steps, prompts per step,
group size, sampling, held-out evaluations at start and end) run through the
same code the services run, called directly:

- prompts, rollout requests, eval requests and train jobs: the scheduler's
  pure builders (``services.scheduler.prompts.PromptSource``,
  ``services.scheduler.outgoing``) on an ``ExperimentView``;
- generation: the rollout service's engine (``services.rollout.engines.build_engine``,
  i.e. the ``TorchEngine``), its adapter bookkeeping (``AdapterSet``: every
  version loaded from the adapter store after its digest is checked), its
  tokenization (``prompt_token_ids``) and its sample cutting (``to_sample``);
  one ``engine.generate`` per request, all of a round's requests in flight at
  once, so they share the engine's decode batches as in the service;
- scoring: the reward service's built-in scorers (``score_builtin``,
  ``combine_scores``, inversion);
- training: the trainer service's ``TrainerCore`` (``handle``: GRPO step,
  tenant swap, adapter version written to the store each step, pruning) in
  one dedicated model thread, as in the service; an experiment's tenant leaves
  the trainer's memory when it ends, as on the ``events`` stream.

Modes: ``interleaved`` N (round-robin steps of N experiments: the N
experiments' step requests, plus the start evaluation at step 0, generate
together in one round, then the N train jobs run one by one; after the last
step the N final evaluations run in one round; the K experiments go through
in groups of N). N=1 is ``serial``: one experiment after another. K =
max(N, ``--experiments``), as in the benchmark's concurrent modes.

Threads: the configs come from the same environment the benchmark gives the
services (``services.cli.local.DEMO_ENV`` plus ``--set``), so
``CLORA_TORCH_THREADS`` (1 in the demo env) sets the engine thread's and the
trainer thread's intra-op threads exactly as in the two services. Logging is
filtered to warnings (the services write info lines to their log files; that
cost is the services', not the floor's).

Measured per mode, after loading the model and one uncounted 1-step warm-up
experiment (as each warm cluster gets): wall time, process CPU time
(``time.process_time``: user + system of every thread of this process), and
the peak resident memory (``ru_maxrss``). Per experiment step:
``cpu_s_per_step`` = CPU seconds / steps done.

    python load_tests/floor.py --experiments 8 --steps 10 --concurrency 1,8 --json /tmp/floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

WARMUP_EVAL_SIZE = 8  # held-out prompts of the uncounted warm-up experiment (as the benchmark's)
ADAPTER_NOT_LOADED_RETRIES = 2  # as the rollout service


# ---------------------------------------------------------------- results (pure)


@dataclass
class FloorRun:
    """What one floor mode measured."""

    n: int  # experiments interleaved (1: serial)
    experiments: int
    steps_done: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    start_accuracies: list[float] = field(default_factory=list)
    final_accuracies: list[float] = field(default_factory=list)
    skipped_updates: int = 0


def floor_row(run: FloorRun) -> dict:
    """One result row: throughput, CPU and wall per experiment step, accuracy."""
    steps = max(run.steps_done, 1)
    return {
        "mode": "serial" if run.n == 1 else "interleaved", "n": run.n, "experiments": run.experiments,
        "steps_done": run.steps_done, "wall_s": run.wall_s, "cpu_s": run.cpu_s,
        "experiments_per_hour": 3600.0 * run.experiments / run.wall_s if run.wall_s > 0 else 0.0,
        "cpu_s_per_step": run.cpu_s / steps, "wall_s_per_step": run.wall_s / steps,
        "cores_busy": run.cpu_s / run.wall_s if run.wall_s > 0 else None,
        "peak_rss_mb": run.peak_rss_mb, "skipped_updates": run.skipped_updates,
        "start_accuracy_mean": statistics.fmean(run.start_accuracies) if run.start_accuracies else None,
        "final_accuracy_mean": statistics.fmean(run.final_accuracies) if run.final_accuracies else None,
    }


def floor_table(rows: list[dict]) -> str:
    from services.cli.experiments import format_table

    def num(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    table = [["FLOOR MODE", "N", "K", "EXP/H", "CPU/STEP S", "WALL/STEP S", "CORES BUSY", "PEAK RSS MB",
              "START ACC", "FINAL ACC"]]
    for r in rows:
        table.append([r["mode"], str(r["n"]), str(r["experiments"]), num(r["experiments_per_hour"], 1),
                      num(r["cpu_s_per_step"], 4), num(r["wall_s_per_step"], 4), num(r["cores_busy"], 2),
                      num(r["peak_rss_mb"], 0), num(_pct(r["start_accuracy_mean"]), 1),
                      num(_pct(r["final_accuracy_mean"]), 1)])
    return format_table(table)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def experiments_for(n: int, experiments: int) -> int:
    """K for a mode of N at once: at least N experiments, so all N slots fill."""
    return max(n, experiments)


# ---------------------------------------------------------------- the loop


class FloorLoop:
    """The engine, adapter bookkeeping, scorers and trainer core of the
    services in one process; ``run_group`` runs experiments in lockstep."""

    def __init__(self, env: dict, data_dir: Path) -> None:
        from services.scheduler.prompts import PromptSource
        from shared.adapters import DirectoryAdapterStore
        from shared.config import RolloutConfig, TrainerConfig, load_config

        environ = {**env, "CLORA_DATA_DIR": str(data_dir)}
        self.rollout_config = load_config(RolloutConfig, [], environ)
        self.trainer_config = load_config(TrainerConfig, [], environ)
        self.store = DirectoryAdapterStore(Path(self.rollout_config.adapter_dir).resolve())
        self.prompts = PromptSource()
        # One thread owns the trainer's model, as in the trainer service.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor-trainer")
        self.engine = None
        self.adapters = None
        self.core = None

    async def setup(self) -> None:
        import structlog

        from services.rollout.engines import build_engine
        from services.rollout.service import AdapterSet
        from services.trainer.service import TrainerCore

        self.engine = build_engine(self.rollout_config)
        await self.engine.start()
        self.adapters = AdapterSet(self.engine, self.store, self.rollout_config.adapter_keep_versions,
                                   structlog.get_logger("floor"))
        self.core = await self._in_trainer(TrainerCore.load, self.trainer_config, self.store)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        self.executor.shutdown(wait=True)

    async def _in_trainer(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------ experiments

    async def run_group(self, specs: Sequence) -> list[tuple[float | None, float | None, int]]:
        """Run ``specs`` in lockstep; per experiment (start accuracy, final accuracy, skipped updates)."""
        from services.scheduler.outgoing import eval_request, rollout_request
        from services.scheduler.state import ExperimentView
        from shared.messages import now

        views = [ExperimentView(spec=spec, status="running") for spec in specs]
        steps = specs[0].steps
        start_evals: dict[str, list[bool]] = {}
        for step in range(steps):
            requests = [rollout_request(v, step, self.prompts.train(v, step), now()) for v in views]
            if step == 0:  # the scheduler issues the start evaluation with step 0
                requests += [eval_request(v, 0, self.prompts.held_out(v), now()) for v in views]
            for scored in await asyncio.gather(*(self.rollout_and_score(r) for r in requests)):
                self._collect(views, scored, start_evals)
            for view in views:
                await self._train(view)
        finals: dict[str, list[bool]] = {}
        requests = [eval_request(v, v.version, self.prompts.held_out(v), now()) for v in views]
        for scored in await asyncio.gather(*(self.rollout_and_score(r) for r in requests)):
            self._collect(views, scored, finals)
        for view in views:  # the experiment ended: its tenant leaves the trainer's memory
            await self._in_trainer(self.core.bank.forget, view.experiment_id)
        return [(_accuracy(start_evals.get(v.experiment_id)), _accuracy(finals.get(v.experiment_id)),
                 v.skipped_updates) for v in views]

    def _collect(self, views, scored, evals: dict[str, list[bool]]) -> None:
        from services.scheduler.outgoing import sample_successes, scored_groups, train_group_id

        completion = scored.completion
        view = next(v for v in views if v.experiment_id == completion.experiment_id)
        for index, group in enumerate(scored_groups(scored)):
            if completion.purpose == "eval":
                evals.setdefault(view.experiment_id, []).append(any(sample_successes(group, view.spec.reward)[:1]))
            else:
                group_id = train_group_id(view.experiment_id, completion.step, index)
                view.groups.setdefault(completion.step, {})[group_id] = group

    async def _train(self, view) -> None:
        from services.scheduler.outgoing import train_job
        from shared.messages import now

        outcome = await self._in_trainer(self.core.handle, train_job(view, now()))
        if outcome.kind != "published":
            raise RuntimeError(f"{view.experiment_id}: train job {outcome.kind}: {outcome.reason}")
        view.groups.pop(view.version, None)
        view.version, view.adapter_path = outcome.version, outcome.path
        view.skipped_updates += int(outcome.stats.skipped_update)

    async def rollout_and_score(self, request):
        """One rollout request as the rollout service handles it (all its
        prompts in the engine at once), then scored as the reward service
        scores it. The message shapes live here only."""
        results = await asyncio.gather(*(self._prompt_result(request, prompt) for prompt in request.prompts))
        return score_completion(completion_of(request, list(results)))

    async def _prompt_result(self, request, prompt):
        from services.rollout.service import adapter_key, prompt_token_ids, stop_tokens, to_sample
        from shared.engine import AdapterNotLoaded
        from shared.messages import PromptResult

        tokenizer = self.engine.tokenizer()
        key = adapter_key(request.experiment_id, request.adapter_version)
        prompt_ids = prompt_token_ids(tokenizer, prompt)
        for attempt in range(ADAPTER_NOT_LOADED_RETRIES + 1):
            async with self.adapters.use(key):
                try:
                    generated = await self.engine.generate(prompt_ids, key, request.sampling)
                    break
                except AdapterNotLoaded:
                    if attempt == ADAPTER_NOT_LOADED_RETRIES:
                        raise
        stops = stop_tokens(tokenizer, request.sampling.stop_token_ids)
        samples = [to_sample(tokenizer, g, stops, request.sampling.stop) for g in generated.samples]
        return PromptResult(prompt=prompt, prompt_token_ids=list(prompt_ids), samples=samples)


def completion_of(request, results: list):
    """The ``Completion`` the rollout service would publish for ``request``."""
    from shared.messages import Completion

    return Completion(request_id=request.request_id, experiment_id=request.experiment_id, step=request.step,
                      purpose=request.purpose, results=results, adapter_version=request.adapter_version,
                      reward=request.reward)


def score_completion(completion):
    """The ``ScoredCompletion`` the reward service would publish (built-in rewards)."""
    from shared.messages import ScoredCompletion

    return ScoredCompletion(completion=completion, scores=[_score_result(completion.reward, r)
                                                            for r in completion.results])


def _score_result(reward, result):
    from services.reward.scoring import RewardError, SampleScore, apply_invert, score_builtin
    from services.reward.worker import combine_scores, failed_score

    try:
        scores = [score_builtin(reward, sample.text, result.prompt.answer) for sample in result.samples]
    except RewardError as exc:
        return failed_score(result, exc.reason)
    if reward.invert:
        scores = [apply_invert(SampleScore(reward=s.reward, correct=s.correct), True) for s in scores]
    return combine_scores(scores)


def _accuracy(results: list[bool] | None) -> float | None:
    return sum(results) / len(results) if results else None


# ---------------------------------------------------------------- modes


async def run_floor(specs_for, concurrency: Sequence[int], env: dict, data_dir: Path,
                    warmup_spec=None) -> list[FloorRun]:
    """One ``FloorRun`` per N; ``specs_for(n)`` gives that mode's K specs."""
    loop = FloorLoop(env, data_dir)
    runs = []
    try:
        await loop.setup()
        if warmup_spec is not None:
            await loop.run_group([warmup_spec])
        for n in concurrency:
            specs = specs_for(n)
            print(f"== floor N={n}: {len(specs)} experiments x {specs[0].steps} steps", flush=True)
            wall_began, cpu_began = time.monotonic(), time.process_time()
            outcomes = []
            for first in range(0, len(specs), n):
                outcomes += await loop.run_group(specs[first:first + n])
            runs.append(FloorRun(
                n=n, experiments=len(specs), steps_done=sum(s.steps for s in specs),
                wall_s=time.monotonic() - wall_began, cpu_s=time.process_time() - cpu_began,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                start_accuracies=[a for a, _, _ in outcomes if a is not None],
                final_accuracies=[f for _, f, _ in outcomes if f is not None],
                skipped_updates=sum(s for _, _, s in outcomes)))
            print(f"   floor N={n}: {runs[-1].wall_s:.1f}s, {runs[-1].cpu_s:.1f} CPU s", flush=True)
    finally:
        await loop.close()
    return runs


def floor_specs(experiments: int, family: str, spec_fields: dict, seed: int, tag: str) -> list:
    """K specs as the benchmark's ``experiment_specs``: identical but for id and seed."""
    import msgspec

    from services.cli.local import demo_specs

    specs = []
    for index in range(experiments):
        (spec,) = demo_specs([family], spec_fields, seed=seed + index)
        specs.append(msgspec.structs.replace(spec, experiment_id=f"tp-{tag}-{index}"))
    return specs


def quiet_logging() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=8, help="K (at least N per mode)")
    parser.add_argument("--steps", type=int, default=None, help="steps per experiment (default: the demo's 10)")
    parser.add_argument("--concurrency", default="1,8", help="N values; 1 is serial")
    parser.add_argument("--family", default=None, help="task family (default: the tiny model's demo advice)")
    parser.add_argument("--seed", type=int, default=0, help="experiment i gets seed SEED + i")
    parser.add_argument("--spec-json", default=None, help="spec fields as JSON (default: the demo's, steps 10)")
    parser.add_argument("--set", dest="extra_env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the configs, as the benchmark's --set")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--data-dir", default=None, help="adapters and checkpoints (default: a temp dir)")
    parser.add_argument("--json", dest="json_path", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import msgspec

    from services.cli.local import DEMO_ENV, demo_settings

    args = build_parser().parse_args(argv)
    families, spec_fields = demo_settings()
    spec_fields = json.loads(args.spec_json) if args.spec_json else {**spec_fields, "steps": 10}
    if args.steps is not None:
        spec_fields["steps"] = args.steps
    family = args.family or (families[0] if families else "add")
    env = dict(DEMO_ENV)
    for item in args.extra_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        env[key] = value
    concurrency = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    if not concurrency or concurrency[0] < 1 or args.experiments < 1 or spec_fields["steps"] < 1:
        raise SystemExit("--concurrency needs integers >= 1; --experiments and --steps must be >= 1")
    quiet_logging()
    warmup = None
    if args.warmup:
        (warmup,) = floor_specs(1, family, spec_fields, args.seed, "floor-warmup")
        warmup = msgspec.structs.replace(warmup, steps=1, eval_size=min(warmup.eval_size, WARMUP_EVAL_SIZE))
    with tempfile.TemporaryDirectory(prefix="clora-floor-") as temporary:
        data_dir = Path(args.data_dir or temporary).resolve()
        runs = asyncio.run(run_floor(
            lambda n: floor_specs(experiments_for(n, args.experiments), family, spec_fields, args.seed, f"f{n}"),
            concurrency, env, data_dir, warmup))
    rows = [floor_row(run) for run in runs]
    print(floor_table(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"env": env, "family": family, "spec_fields": spec_fields,
                                                    "results": rows, "runs": [asdict(r) for r in runs]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
