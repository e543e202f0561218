"""Each experiment's own LoRA shape (issue 18), end to end on the shipped tiny
model: two experiments of ranks 8 and 2, with different alphas and target
sets, train in one ``LocalCluster`` run on a rank-8 deployment, share the
rollout's decode steps, and each published version is a plain PEFT adapter
of the experiment's own shape whose logprobs under PEFT are the embedded
engine's (both adapters served in one batch).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from services.cli.experiments import ProgressDisplay, watch_until_done
from services.cli.local import LocalCluster
from services.rollout.torch_engine import TorchEngine
from shared.adapters import AdapterStore
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.engine import AdapterKey, LoraSignature
from shared.messages import ExperimentSpec, RewardSpec, SamplingParams, TaskSource
from tests.integration.cluster_procs import rollout_status_after

MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
]

CLUSTER_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json"}
# Few rows at once: a step's rollout outlasts the other experiment's train step, so their rows meet in the batch
# (with room for everything, the tiny model's rollouts finish so fast that the two experiments just alternate).
ROLLOUT_ENV = {"CLORA_MAX_ROWS": "16"}
RUN_TIMEOUT_S = 240.0
STEPS = 6
DEPLOYMENT = LoraSignature()  # the services' default: rank 8, alpha 16, all seven projections
LOGPROB_ATOL = 1e-4
# experiment id -> (lora_rank, lora_alpha, lora_targets); None: the deployment's
SHAPES = {
    "narrow-r2": (2, 6.0, ["q_proj", "v_proj", "down_proj"]),
    "wide-r8": (8, None, None),
}


class _Quiet(ProgressDisplay):
    def show(self, records) -> None:
        return None


def shaped_spec(experiment_id: str, family: str) -> ExperimentSpec:
    rank, alpha, targets = SHAPES[experiment_id]
    return ExperimentSpec(
        experiment_id=experiment_id, task=TaskSource(family=family), reward=RewardSpec(type="family", family=family),
        steps=STEPS, prompts_per_step=16, group_size=8, max_tokens=8, eval_size=16, learning_rate=3e-3,
        lora_rank=rank, lora_alpha=alpha, lora_targets=targets,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Both experiments run to the end in one cluster; yields the adapter
    store and the rollout's ``shared_steps``."""
    cluster = LocalCluster(tmp_path_factory.mktemp("shapes"), env=CLUSTER_ENV, service_env={"rollout": ROLLOUT_ENV})
    try:
        cluster.start()
        cluster.wait_ready()
        client = CloraClient.connect(cluster.url, cluster.stream_prefix)
        for experiment_id, family in (("narrow-r2", "add"), ("wide-r8", "sort")):
            client.submit(shaped_spec(experiment_id, family))
        ids = list(SHAPES)

        def should_stop() -> bool:
            cluster.check_alive()
            return False

        records = watch_until_done(client, None, ids, timeout_s=RUN_TIMEOUT_S, display=_Quiet(),
                                   should_stop=should_stop)
        for experiment_id, record in zip(ids, records, strict=True):
            assert record is not None and record.status == "finished", (experiment_id, record)
        status = rollout_status_after(client, max(r.finished_at for r in records if r is not None))
        yield AdapterStore(cluster.data_dir / "adapters"), status["shared_steps"]
    finally:
        cluster.stop()


def test_two_shapes_train_in_one_run_and_share_decode_steps(finished_run):
    store, shared_steps = finished_run
    assert shared_steps.get("narrow-r2|wide-r8", 0) > 0, shared_steps
    for experiment_id, (rank, alpha, targets) in SHAPES.items():
        assert store.latest_version(experiment_id) == STEPS
        path = store.path(experiment_id, STEPS)
        config = json.loads((path / "adapter_config.json").read_text())
        expected_targets = sorted(targets or DEPLOYMENT.target_modules)
        assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
            rank, alpha or DEPLOYMENT.alpha, expected_targets)
        tensors = store.load_tensors(path)
        assert {name.split(".")[-3] for name in tensors} == set(expected_targets)
        for name, tensor in tensors.items():
            assert tensor.shape[0 if ".lora_A." in name else 1] == rank, name
        # trained: B moved away from its zero init
        assert any(t.abs().max() > 0 for name, t in tensors.items() if ".lora_B." in name), experiment_id


def peft_model(adapter_dir: Path):
    """The base model with the adapter loaded as is, by PEFT itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_DIR), adapter_dir).eval()


def peft_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of ``token_ids`` after ``prompt_ids`` under ``model``."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logprobs_T_V = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(token_ids) - 1)
    return logprobs_T_V[positions, torch.tensor(token_ids)]


def test_each_published_adapter_loads_in_peft_and_gives_the_engines_logprobs(finished_run):
    store, _ = finished_run
    paths = {experiment_id: store.path(experiment_id, STEPS) for experiment_id in SHAPES}

    async def generate_in_one_batch():
        engine = TorchEngine(MODEL_DIR, DEPLOYMENT, max_rows=16, max_loras=2, device="cpu", torch_threads=1)
        await engine.start()
        try:
            for experiment_id, path in paths.items():
                await engine.register_adapter(AdapterKey(experiment_id, STEPS), path=path)
            prompt = engine.tokenizer()("12+34=")["input_ids"]
            sampling = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7)
            results = await asyncio.gather(*(engine.generate(prompt, AdapterKey(e, STEPS), sampling) for e in paths))
            return dict(zip(paths, results, strict=True)), engine.stats().shared_steps
        finally:
            await engine.close()

    results, shared_steps = asyncio.run(generate_in_one_batch())
    assert shared_steps.get("narrow-r2|wide-r8", 0) > 0, shared_steps  # one batch held both adapters
    for experiment_id, result in results.items():
        reference = peft_model(paths[experiment_id])
        for sample in result.samples:
            expected = peft_logprobs(reference, result.prompt_token_ids, sample.token_ids)
            torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)
