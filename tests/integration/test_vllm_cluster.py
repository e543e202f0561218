"""A whole experiment with the rollout on vLLM (its CUDA or its CPU build):
the four services as processes (``LocalCluster``), the rollout worker with
``CLORA_ENGINE=vllm``, the trainer publishing versions and vLLM hot-loading
them. Checks that both tenants learn, that every completion's logprobs equal
the trainer's recomputation under the version the completion names, and
that the two tenants shared vLLM's engine steps.

Skips only where vLLM is not installed or has no CUDA/CPU platform.
"""

from __future__ import annotations

import pytest
import torch

from services.cli.local import LocalCluster
from services.trainer import grpo
from shared.adapters import AdapterStore
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.messages import Completion
from tests.integration.test_end_to_end import (
    CLUSTER_ENV,
    read_stream,
    rollout_status_after,
    spec,
    submit,
    wait_finished,
)

pytest.importorskip("vllm")
from vllm.platforms import current_platform  # noqa: E402

if not (current_platform.is_cuda() or current_platform.is_cpu()):
    pytest.skip(f"vLLM platform {current_platform.device_type!r} is neither CUDA nor CPU", allow_module_level=True)

pytestmark = pytest.mark.slow

VLLM_ROLLOUT_ENV = {
    "CLORA_ENGINE": "vllm",
    "CLORA_DTYPE": "float32",  # parity with the float32 trainer on any platform
    "CLORA_MAX_MODEL_LEN": "0",  # from the model's config
    "CLORA_GPU_MEMORY_UTILIZATION": "0.3",  # on a GPU; on a CPU the KV cache is sized in GiB instead
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB (vLLM's own setting, on CPU)
}
STEPS = 12
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides


@pytest.fixture
def vllm_cluster(tmp_path):
    cluster = LocalCluster(tmp_path / "cluster", env=CLUSTER_ENV,
                           service_env={"rollout": VLLM_ROLLOUT_ENV,
                                        # every version stays on disk, so each can be recomputed
                                        "trainer": {"CLORA_ADAPTER_RETAIN_VERSIONS": str(STEPS + 2)}})
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=300.0)
        yield cluster, CloraClient.connect(cluster.url, cluster.stream_prefix)
    finally:
        cluster.stop()


def load_version(store: AdapterStore, experiment_id: str, version: int):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa")
    if version > 0:
        model = PeftModel.from_pretrained(model, store.path(experiment_id, version))
    return model.eval()


@torch.no_grad()
def logprob_gaps(model, completions: list[Completion], temperature: float) -> list[float]:
    """For each sample, the largest |engine logprob - trainer's recomputation|."""
    gaps = []
    for result in (r for completion in completions for r in completion.results):
        for sample in result.samples:
            example = grpo.SequenceExample(prompt_ids=result.prompt_token_ids, completion_ids=sample.token_ids,
                                           behaviour_logprobs=sample.logprobs, advantage=0.0)
            batch = grpo.build_batch([example])
            recomputed_K = grpo.model_logprobs(model, batch, temperature)
            gaps.append(float((recomputed_K - batch.behaviour_logprobs_K).abs().max()))
    return gaps


def test_experiments_learn_with_the_rollout_on_vllm(vllm_cluster):
    cluster, client = vllm_cluster
    learning = {"steps": STEPS, "prompts_per_step": 8, "group_size": 8, "learning_rate": 3e-3, "eval_size": 32,
                "temperature": 1.0}
    specs = [spec("vllm-sort", "sort", **learning), spec("vllm-reverse", "reverse", **learning)]
    submit(client, specs)
    records = {r.experiment_id: r for r in wait_finished(cluster, client, [s.experiment_id for s in specs])}

    for experiment_id, record in records.items():
        rewards = [m.reward_mean for m in client.metrics(experiment_id)]
        assert len(rewards) == STEPS
        assert record.final_accuracy > record.start_accuracy, (experiment_id, record, rewards)
        assert max(rewards[-3:]) > min(rewards[:3]), (experiment_id, rewards)

    # Each train completion's logprobs equal the trainer's recomputation under
    # the version it names: the base (v0), an early and the last trained version.
    store = AdapterStore(cluster.data_dir / "adapters")
    completions = [c for c in read_stream(client, "completions", Completion)
                   if c.purpose == "train" and c.error is None]
    for experiment_id in records:
        by_version: dict[int, list[Completion]] = {}
        for completion in completions:
            if completion.experiment_id == experiment_id:
                by_version.setdefault(completion.adapter_version, []).append(completion)
        assert len(by_version) >= STEPS - 1, sorted(by_version)  # a new version nearly every step
        assert max(by_version) >= STEPS - 1  # vLLM hot-loaded the trainer's versions as they came
        for version in sorted({0, sorted(by_version)[1], max(by_version)} & set(by_version)):
            gaps = logprob_gaps(load_version(store, experiment_id, version), by_version[version][:4], 1.0)
            assert gaps and max(gaps) < LOGPROB_TOLERANCE, (experiment_id, version, max(gaps))

    # Both tenants' rows ran in the same vLLM engine steps.
    status = rollout_status_after(client, max(r.finished_at for r in records.values()))
    assert status["shared_steps"].get("vllm-reverse|vllm-sort", 0) > 0, status
    assert status["adapter_loads"] >= 2 * (STEPS - 1)
