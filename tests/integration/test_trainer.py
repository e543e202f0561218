"""The trainer: adapter store, tenant swapping, learning, and the service on
the real Redis protocol (redelivery, NaN loss, rank check, restart).

Uses a tiny random Qwen3 (hidden 64, 2 layers, initializer_range 0.1: with
the default 0.02 a random model barely responds to LoRA, see FACTS) saved to
a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
import torch

from services.trainer.service import TrainerCore, TrainerService, load_policy_model
from shared.adapters import (
    DIGEST_FILE,
    WEIGHTS_FILE,
    AdapterStore,
    DigestMismatch,
    DirectoryAdapterStore,
    IncompleteAdapter,
)
from shared.bus import StreamBus
from shared.config import TrainerConfig
from shared.engine import LoraSignature
from shared.messages import (
    AdapterPublished,
    ExperimentEvent,
    Prompt,
    PromptResult,
    PromptScore,
    Sample,
    ScoredGroup,
    TrainHyper,
    TrainJob,
    decode,
)

VOCAB = 64
SIGNATURE = LoraSignature(rank=8, alpha=16.0)
PROMPTS = [[3, 17, 29, 5], [11, 2, 40, 7], [21, 33, 8, 14], [9, 50, 1, 26]]
GROUP_SIZE = 8
COMPLETION_TOKENS = 3
EVENTUALLY_S = 60.0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, initializer_range=0.1, tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny-qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's two cores are shared
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- helpers


def sample_group(model, prompt_ids: list[int], n: int, generator: torch.Generator):
    """``n`` completions of ``COMPLETION_TOKENS`` tokens sampled from ``model``
    at temperature 1, with their behaviour logprobs."""
    ids_N_T = torch.tensor([prompt_ids] * n)
    logprobs = []
    with torch.no_grad():
        for _ in range(COMPLETION_TOKENS):
            logprobs_N_V = torch.log_softmax(model(input_ids=ids_N_T).logits[:, -1].float(), -1)
            token_N_1 = torch.multinomial(logprobs_N_V.exp(), 1, generator=generator)
            logprobs.append(logprobs_N_V.gather(-1, token_N_1))
            ids_N_T = torch.cat([ids_N_T, token_N_1], dim=1)
    return ids_N_T[:, len(prompt_ids):].tolist(), torch.cat(logprobs, dim=1).tolist()


def scored_group(tenant: str, step: int, index: int, prompt_ids, completions, logprobs, rewards,
                 adapter_version: int) -> ScoredGroup:
    samples = [Sample(token_ids=t, logprobs=lp, text="", finish_reason="length")
               for t, lp in zip(completions, logprobs, strict=True)]
    result = PromptResult(prompt=Prompt(prompt_id=f"{tenant}:s{step}:p{index}", text=""),
                          prompt_token_ids=list(prompt_ids), samples=samples)
    return ScoredGroup(adapter_version=adapter_version, result=result, score=PromptScore(rewards=list(rewards)))


def train_job(tenant: str, step: int, groups, base_version: int | None = None, rank: int = SIGNATURE.rank,
              **hyper) -> TrainJob:
    hyper = {"learning_rate": 1e-2, **hyper}
    return TrainJob(job_id=f"{tenant}:s{step}", experiment_id=tenant, step=step,
                    base_version=step if base_version is None else base_version, lora_rank=rank,
                    groups=groups, hyper=TrainHyper(**hyper))


def target_reward(completions, target_token: int) -> list[float]:
    return [sum(t == target_token for t in c) / len(c) for c in completions]


def target_probability(model, target_token: int) -> float:
    """Mean probability of ``target_token`` as the first completion token."""
    with torch.no_grad():
        logits_P_V = model(input_ids=torch.tensor(PROMPTS)).logits[:, -1].float()
    return torch.softmax(logits_P_V, -1)[:, target_token].mean().item()


def snapshot(state) -> dict[str, torch.Tensor]:
    tensors = {f"w/{n}": t.clone() for n, t in state.weights.items()}
    tensors.update({f"m/{n}": t.clone() for n, t in state.exp_avg.items()})
    tensors.update({f"v/{n}": t.clone() for n, t in state.exp_avg_sq.items()})
    return tensors


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def random_groups(tenant: str, step: int, adapter_version: int, seed: int, nan_logprobs: bool = False):
    """Groups with random completions; behaviour logprobs near uniform."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for index, prompt_ids in enumerate(PROMPTS[:2]):
        completions = torch.randint(0, VOCAB, (4, COMPLETION_TOKENS), generator=generator).tolist()
        logprobs = [[float("nan") if nan_logprobs else -4.0] * COMPLETION_TOKENS for _ in completions]
        rewards = [float(i % 2) for i in range(4)]
        groups.append(scored_group(tenant, step, index, prompt_ids, completions, logprobs, rewards, adapter_version))
    return groups


# ---------------------------------------------------------------- the store


def test_store_writes_complete_immutable_versions(tmp_path):
    store = AdapterStore(tmp_path)
    assert isinstance(store, DirectoryAdapterStore)
    assert store.latest_version("exp") == 0
    tensors = {"base_model.model.x.lora_A.weight": torch.randn(8, 4)}
    path, digest = store.write_version("exp", 1, tensors, SIGNATURE, "base")
    assert store.is_complete("exp", 1) and store.verify(path) == digest
    assert (path / DIGEST_FILE).read_text() == digest
    assert torch.equal(store.load_tensors(path)["base_model.model.x.lora_A.weight"],
                       tensors["base_model.model.x.lora_A.weight"])
    # Immutable: writing the same version again changes nothing and returns the existing digest.
    again = store.write_version("exp", 1, {"base_model.model.x.lora_A.weight": torch.zeros(8, 4)}, SIGNATURE, "base")
    assert again == (path, digest)
    assert not torch.equal(store.load_tensors(path)["base_model.model.x.lora_A.weight"], torch.zeros(8, 4))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16.0
    assert store.latest_version("exp") == 1


def test_store_ignores_and_replaces_an_incomplete_version(tmp_path):
    store = DirectoryAdapterStore(tmp_path)
    tensors = {"base_model.model.x.lora_B.weight": torch.ones(4, 8)}
    path, digest = store.write_version("exp", 2, tensors, SIGNATURE, "base")
    (path / DIGEST_FILE).unlink()  # as if the writer died between the rename and the digest
    assert not store.is_complete("exp", 2) and store.latest_version("exp") == 0
    with pytest.raises(IncompleteAdapter):
        store.load_tensors(path)
    assert store.write_version("exp", 2, tensors, SIGNATURE, "base") == (path, digest)
    assert store.latest_version("exp") == 2


def test_store_detects_tampered_files(tmp_path):
    store = DirectoryAdapterStore(tmp_path)
    path, _ = store.write_version("exp", 1, {"base_model.model.x.lora_A.weight": torch.ones(2, 2)}, SIGNATURE, "base")
    with open(path / WEIGHTS_FILE, "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x7f")
    with pytest.raises(DigestMismatch):
        store.load_tensors(path)


# ---------------------------------------------------------------- learning through the swap


def test_two_tenants_learn_opposite_rewards_while_an_idle_tenant_stays_bit_identical(tiny_model_dir, tmp_path):
    model = load_policy_model(str(tiny_model_dir), SIGNATURE, device="cpu")
    core = TrainerCore(model, DirectoryAdapterStore(tmp_path / "adapters"), tmp_path / "checkpoints",
                       SIGNATURE, str(tiny_model_dir))
    bank = core.bank
    # Targets the base model samples sometimes (so groups have signal) but rarely prefers.
    with torch.no_grad(), model.disable_adapter():
        mean_probability_V = torch.softmax(model(input_ids=torch.tensor(PROMPTS)).logits[:, -1], -1).mean(0)
    ranked = torch.argsort(mean_probability_V, descending=True).tolist()
    targets = {"likes-x": ranked[4], "likes-y": ranked[5]}
    for tenant in targets:
        bank.register(tenant)
    idle_before = snapshot(bank.register("idle"))
    with torch.no_grad(), model.disable_adapter():
        base_probability = {t: target_probability(model, token) for t, token in targets.items()}
    updates = 0
    generator = torch.Generator().manual_seed(0)
    steps = 8
    for step in range(steps):
        for tenant, token in targets.items():
            other = next(t for t in targets if t != tenant)
            other_before = snapshot(bank.get(other)) if bank.active != other else None
            bank.swap_in(tenant)
            groups = []
            for index, prompt_ids in enumerate(PROMPTS):
                completions, logprobs = sample_group(model, prompt_ids, GROUP_SIZE, generator)
                groups.append(scored_group(tenant, step, index, prompt_ids, completions, logprobs,
                                           target_reward(completions, token), adapter_version=step))
            outcome = core.handle(train_job(tenant, step, groups))
            assert outcome.kind == "published" and outcome.version == step + 1
            updates += not outcome.stats.skipped_update
            if other_before is not None:  # the other tenant's state, untouched by this update
                assert_identical(other_before, snapshot(bank.get(other)))
    assert updates >= steps  # most steps had signal
    learned = {}
    for tenant in targets:
        bank.swap_in(tenant)
        learned[tenant] = {t: target_probability(model, tok) for t, tok in targets.items()}
    assert learned["likes-x"]["likes-x"] > max(0.3, 3 * base_probability["likes-x"])
    assert learned["likes-y"]["likes-y"] > max(0.3, 3 * base_probability["likes-y"])
    assert learned["likes-x"]["likes-y"] < base_probability["likes-y"]
    assert learned["likes-y"]["likes-x"] < base_probability["likes-x"]
    # The idle tenant: bit-identical state, and exactly the base model.
    bank.swap_in("idle")
    bank.swap_out()
    assert_identical(idle_before, snapshot(bank.get("idle")))
    bank.swap_in("idle")
    input_ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        idle_logits = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids).logits
    assert torch.equal(idle_logits, base_logits)


def test_nothing_to_learn_still_publishes_the_next_version_unchanged(tiny_model_dir, tmp_path):
    model = load_policy_model(str(tiny_model_dir), SIGNATURE, device="cpu")
    store = DirectoryAdapterStore(tmp_path / "adapters")
    core = TrainerCore(model, store, tmp_path / "checkpoints", SIGNATURE, str(tiny_model_dir))
    trained = core.handle(train_job("exp", 0, random_groups("exp", 0, 0, seed=1)))
    flat = [scored_group("exp", 1, 0, PROMPTS[0], [[1, 2, 3]] * 4, [[-4.0] * 3] * 4, [1.0] * 4, 1)]
    stale = random_groups("exp", 1, 0, seed=2)  # sampled by version 0, on-policy job for version 1
    outcome = core.handle(train_job("exp", 1, flat + stale))
    assert outcome.kind == "published" and outcome.version == 2
    assert outcome.stats.skipped_update and outcome.stats.skip_reason == "no_signal"
    assert outcome.stats.skipped_groups == 3
    assert [e[1] for e in outcome.events] == ["stale_samples_dropped"]
    assert_identical(store.load_tensors(trained.path), store.load_tensors(outcome.path))


def test_micro_batches_and_kl_give_the_same_update_as_one_batch(tiny_model_dir, tmp_path):
    job = train_job("exp", 0, random_groups("exp", 0, 0, seed=3), kl_coef=0.1)
    weights = []
    for micro_batch_tokens in (16384, 40):
        model = load_policy_model(str(tiny_model_dir), SIGNATURE, device="cpu")
        store = DirectoryAdapterStore(tmp_path / f"adapters-{micro_batch_tokens}")
        core = TrainerCore(model, store, tmp_path / f"checkpoints-{micro_batch_tokens}", SIGNATURE,
                           str(tiny_model_dir), micro_batch_tokens=micro_batch_tokens)
        outcome = core.handle(job)
        assert outcome.kind == "published" and not outcome.stats.skipped_update
        assert outcome.stats.kl == 0.0  # measured before the update: the fresh adapter is the base
        weights.append(store.load_tensors(outcome.path))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-6), name
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in weights[0].items() if "lora_B" in n)


# ---------------------------------------------------------------- each tenant's own LoRA shape

SMALL = LoraSignature(rank=2, alpha=6.0, target_modules=("q_proj", "v_proj", "down_proj"))


def shaped_job(tenant: str, step: int, shape: LoraSignature, seed: int) -> TrainJob:
    """A job for a tenant of its own LoRA shape."""
    job = train_job(tenant, step, random_groups(tenant, step, step, seed=seed), rank=shape.rank)
    return msgspec.structs.replace(job, lora_alpha=shape.alpha, lora_targets=list(shape.target_modules))


def test_a_rank_2_tenant_trains_exactly_as_a_rank_2_adapter_with_its_own_alpha(tiny_model_dir, tmp_path):
    """A rank-2, alpha-6 tenant (scaling 3; the deployment's is 2) on three
    of the modules of a rank-8 deployment, swapped with a full-shape tenant
    between its steps and restarted once, publishes exactly what a
    deployment of that very shape (a plain PEFT rank-2 model) publishes for
    the same jobs."""

    def make_core(signature: LoraSignature, name: str) -> TrainerCore:
        model = load_policy_model(str(tiny_model_dir), signature, device="cpu")
        return TrainerCore(model, DirectoryAdapterStore(tmp_path / name / "adapters"), tmp_path / name / "checkpoints",
                           signature, str(tiny_model_dir))

    mixed, alone = make_core(SIGNATURE, "mixed"), make_core(SMALL, "alone")
    for step in range(3):
        if step == 2:  # a restart: weights and shape from the store, moments from the checkpoint
            mixed = make_core(SIGNATURE, "mixed")
        for core in (mixed, alone):
            outcome = core.handle(shaped_job("small", step, SMALL, seed=10 + step))
            assert outcome.kind == "published" and not outcome.stats.skipped_update, outcome
        wide = mixed.handle(shaped_job("wide", step, SIGNATURE, seed=20 + step))
        assert wide.kind == "published" and not wide.stats.skipped_update

    for version in (1, 2, 3):
        got = mixed.store.load_tensors(mixed.store.path("small", version))
        expected = alone.store.load_tensors(alone.store.path("small", version))
        assert got.keys() == expected.keys() and len(got) == 2 * 2 * 3  # layers x (A, B) x targets
        for name, tensor in got.items():
            assert tensor.shape[0 if ".lora_A." in name else 1] == 2, name
            torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)
        assert any(t.abs().max() > 1e-4 for n, t in got.items() if "lora_B" in n)  # it did learn
    config = json.loads((mixed.store.path("small", 3) / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 6.0, ["down_proj", "q_proj", "v_proj"])
    wide_config = json.loads((mixed.store.path("wide", 3) / "adapter_config.json").read_text())
    assert (wide_config["r"], len(wide_config["target_modules"])) == (8, 7)

    # Another shape for the same tenant, or one the deployment cannot hold: refused for good.
    for shape in (replace(SMALL, rank=4), replace(SMALL, target_modules=("q_proj", "lm_head")),
                  replace(SMALL, alpha=float("nan")), replace(SIGNATURE, rank=16)):
        outcome = mixed.handle(shaped_job("small", 3, shape, seed=1))
        assert outcome.kind == "rejected" and outcome.reason.startswith("rank_mismatch"), (shape, outcome)
    assert mixed.store.latest_version("small") == 3


# ---------------------------------------------------------------- the service


def service_config(redis_url: str, prefix: str, model_dir: Path, data_dir: Path, **overrides) -> TrainerConfig:
    config = TrainerConfig(
        redis_url=redis_url, stream_prefix=prefix, model_dir=str(model_dir), data_dir=str(data_dir),
        consumer_name="trainer-test", device="cpu", lora_rank=SIGNATURE.rank, lora_alpha=SIGNATURE.alpha,
        max_deliveries=2, drain_timeout_s=10.0, heartbeat_ttl_s=2.0,
    )
    return replace(config, **overrides)


async def start(service: TrainerService) -> asyncio.Task:
    await service.setup()
    return asyncio.create_task(service.run(), name="trainer-under-test")


async def stop(service: TrainerService, task: asyncio.Task) -> None:
    service.stop()
    await asyncio.wait_for(task, EVENTUALLY_S)
    await service.close()


class StreamReader:
    """Reads a stream from its start, remembering where it got to."""

    def __init__(self, redis, prefix: str, stream: str) -> None:
        self.redis, self.key, self.stream, self.last_id = redis, prefix + stream, stream, "0"

    async def read(self, count: int, timeout_s: float = EVENTUALLY_S) -> list:
        found = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < count:
            remaining_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
            if remaining_ms <= 0:
                raise AssertionError(f"{len(found)} of {count} messages on {self.key} in {timeout_s} s")
            reply = await self.redis.xread({self.key: self.last_id}, block=min(remaining_ms, 500))
            for _, entries in reply:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    found.append(decode(fields[b"msg"], self.stream))
        return found


async def test_service_trains_republishes_survives_nan_and_rejects_a_rank_over_the_deployments(
        tiny_model_dir, tmp_path, redis_url, stream_prefix, async_redis):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bus = StreamBus(async_redis, prefix=stream_prefix)
    adapters = StreamReader(async_redis, stream_prefix, "adapters")
    events = StreamReader(async_redis, stream_prefix, "events")
    service = TrainerService(service_config(redis_url, stream_prefix, tiny_model_dir, tmp_path))
    task = await start(service)
    try:
        jobs = [train_job("exp", s, random_groups("exp", s, s, seed=s)) for s in range(2)]
        jobs.append(train_job("exp", 2, random_groups("exp", 2, 2, seed=2, nan_logprobs=True)))
        for job in jobs:
            await bus.publish(job, "train_jobs:0")
        published: list[AdapterPublished] = await adapters.read(3)
        assert [(p.version, p.step) for p in published] == [(1, 0), (2, 1), (3, 2)]
        assert [p.stats.skipped_update for p in published] == [False, False, True]
        nan_events = [e for e in await events.read(1) if isinstance(e, ExperimentEvent)]
        assert [(e.experiment_id, e.code) for e in nan_events] == [("exp", "nan_loss")]
        store = service.store
        for p in published:
            assert Path(p.path).is_absolute() and store.verify(p.path) == p.digest
        assert_identical(store.load_tensors(published[1].path), store.load_tensors(published[2].path))

        # Redelivery of a job already done: re-announced, not trained again.
        adam_step = service.core.bank.optimizer_tensors("exp")[1]
        await bus.publish(jobs[1], "train_jobs:0")
        (again,) = await adapters.read(1)
        assert (again.version, again.digest) == (2, published[1].digest)
        assert service.jobs_trained == 3 and service.jobs_republished == 1
        assert service.core.bank.optimizer_tensors("exp")[1] == adam_step == 2
        assert service.core.bank.get("exp").version == 3

        # A rank over the deployment's: an event and a dead letter, nothing published.
        await bus.publish(train_job("other", 0, random_groups("other", 0, 0, seed=5), rank=16), "train_jobs:0")
        (rank_event,) = await events.read(1)
        assert rank_event.code == "rank_mismatch" and "rank 16" in rank_event.message
        letters = await wait_for_dead_letters(bus, 1)
        assert "rank" in letters[0].reason

        # Out of order (step 1 before step 0): retried, not lost; versions stay contiguous.
        await bus.publish(train_job("late", 1, random_groups("late", 1, 1, seed=7)), "train_jobs:0")
        await bus.publish(train_job("late", 0, random_groups("late", 0, 0, seed=8)), "train_jobs:0")
        late = await adapters.read(2)
        assert [(p.experiment_id, p.version, p.step) for p in late] == [("late", 1, 0), ("late", 2, 1)]
        (gap_event,) = await events.read(1)
        assert (gap_event.experiment_id, gap_event.code) == ("late", "train_job_out_of_order")
        assert len(await bus.dead_letters("train_jobs:0")) == 1
    finally:
        await stop(service, task)

    # A published version loads with plain PEFT and is the adapter the trainer trained.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, published[1].path).eval()
    stored = store.load_tensors(published[1].path)
    loaded = {k.replace(".default.", "."): v for k, v in peft_model.named_parameters() if "lora_" in k}
    assert_identical(stored, loaded)
    input_ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        adapted = peft_model(input_ids=input_ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=input_ids).logits
    assert not torch.allclose(adapted, plain)


async def wait_for_dead_letters(bus: StreamBus, count: int):
    for _ in range(int(EVENTUALLY_S / 0.1)):
        letters = await bus.dead_letters("train_jobs:0")
        if len(letters) >= count:
            return letters
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} dead letters")


async def test_restart_resumes_from_store_and_checkpoint(tiny_model_dir, tmp_path, redis_url, stream_prefix,
                                                         async_redis):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    adapters = StreamReader(async_redis, stream_prefix, "adapters")
    config = service_config(redis_url, stream_prefix, tiny_model_dir, tmp_path)
    first = TrainerService(config)
    task = await start(first)
    try:
        for step in range(2):
            await bus.publish(train_job("exp", step, random_groups("exp", step, step, seed=step)), "train_jobs:0")
        await adapters.read(2)
        await first._in_model_thread(first.core.bank.swap_out)
        before = snapshot(first.core.bank.get("exp"))
    finally:
        await stop(first, task)

    second = TrainerService(config)
    task = await start(second)
    try:
        # Restored exactly: weights from the store (version 2), moments and step count from the checkpoint.
        state = await second._in_model_thread(second.core.bank.ensure, "exp")
        assert (state.version, state.adam_step) == (2, 2)
        assert_identical(before, snapshot(state))
        # A job from before the restart is re-announced; the next one continues at version 3.
        await bus.publish(train_job("exp", 1, random_groups("exp", 1, 1, seed=1)), "train_jobs:0")
        await bus.publish(train_job("exp", 2, random_groups("exp", 2, 2, seed=2)), "train_jobs:0")
        republished, published = await adapters.read(2)
        assert (republished.version, published.version) == (2, 3)
        assert second.jobs_trained == 1 and second.jobs_republished == 1
        assert not published.stats.skipped_update
        assert second.store.latest_version("exp") == 3
        assert second.core.bank.optimizer_tensors("exp")[1] == 3
    finally:
        await stop(second, task)


async def test_an_ended_experiment_leaves_trainer_memory_and_a_late_job_restores_it(
        tiny_model_dir, tmp_path, redis_url, stream_prefix, async_redis):
    from shared.messages import now

    bus = StreamBus(async_redis, prefix=stream_prefix)
    adapters = StreamReader(async_redis, stream_prefix, "adapters")
    service = TrainerService(service_config(redis_url, stream_prefix, tiny_model_dir, tmp_path))
    task = await start(service)
    try:
        for tenant in ("done", "busy"):
            for step in range(2):
                await bus.publish(train_job(tenant, step, random_groups(tenant, step, step, seed=step)), "train_jobs:0")
        await adapters.read(4)
        bank = service.core.bank
        await service._in_model_thread(bank.swap_out)
        busy_before = snapshot(bank.get("busy"))
        # Events that do not end an experiment, or name one this trainer never saw, change nothing.
        for experiment_id, code in (("done", "admitted"), ("done", "nan_loss"), ("elsewhere", "finished")):
            await bus.publish(ExperimentEvent(experiment_id=experiment_id, level="info", code=code, message="",
                                              ts=now()))
        await bus.publish(ExperimentEvent(experiment_id="done", level="info", code="finished", message="", ts=now()))
        for _ in range(int(EVENTUALLY_S / 0.05)):
            if not bank.has("done"):
                break
            await asyncio.sleep(0.05)
        assert not bank.has("done") and bank.has("busy")
        assert service.status()["tenants"] == 1
        assert_identical(busy_before, snapshot(bank.get("busy")))
        # A late job for the ended experiment: restored from the store and its checkpoint, not restarted.
        await bus.publish(train_job("done", 2, random_groups("done", 2, 2, seed=2)), "train_jobs:0")
        (late,) = await adapters.read(1)
        assert (late.experiment_id, late.version) == ("done", 3) and not late.stats.skipped_update
        assert bank.optimizer_tensors("done")[1] == 3
    finally:
        await stop(service, task)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_tenants_on_cuda_live_in_pinned_memory_and_stay_isolated(tiny_model_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = load_policy_model(str(tiny_model_dir), SIGNATURE, device="cuda")  # bf16 base, fp32 LoRA
    core = TrainerCore(model, DirectoryAdapterStore(tmp_path / "adapters"), tmp_path / "checkpoints",
                       SIGNATURE, str(tiny_model_dir))
    idle = core.bank.register("idle")
    idle_before = snapshot(idle)
    assert all(t.is_pinned() for t in idle.weights.values())
    for step in range(2):
        for tenant in ("a", "b"):
            outcome = core.handle(train_job(tenant, step, random_groups(tenant, step, step, seed=step)))
            assert outcome.kind == "published" and not outcome.stats.skipped_update
    core.bank.swap_out()
    assert_identical(idle_before, snapshot(core.bank.get("idle")))
    for tenant in ("a", "b"):
        stored = core.store.load_tensors(core.store.path(tenant, 2))
        assert_identical(stored, core.bank.get(tenant).weights)
    lora_b = next(name for name in stored if ".lora_B." in name)
    assert not torch.equal(core.bank.get("a").weights[lora_b], core.bank.get("b").weights[lora_b])
