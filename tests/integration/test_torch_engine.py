"""The embedded multi-LoRA engine against PEFT on tiny random models.

What issue 3 asks to show: (1) a row's logits inside a mixed batch of
adapters equal PEFT's model with only that adapter; slot 0 equals the base;
(2) greedy completions of one mixed batch equal separate per-adapter runs;
(3) a version loaded while generation runs: in-flight rows finish on the old
version, new requests get the new one, decode steps kept coming during the
load; (4) clear errors, reproducible seeded sampling.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch

from services.rollout.torch_engine import TorchEngine
from services.rollout.torch_runner import ModelRunner
from shared.engine import AdapterKey, AdapterNotLoaded, EngineError, LoraSignature
from shared.messages import SamplingParams

SIGNATURE = LoraSignature(rank=8, alpha=16.0)
CHARS = "0123456789+-*/=() abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;?!'\"<>[]{}#$%&@^_|~"
LOGITS_ATOL = 1e-4
LOAD_OBSERVE_TIMEOUT_S = 20.0
# (rank, lora_alpha) of the four test adapters: a smaller rank is zero-padded
ADAPTER_SHAPES = ((8, 16.0), (4, 8.0), (8, 32.0), (8, 16.0))


# ---------------------------------------------------------------- builders


def build_tokenizer(model_dir: Path) -> int:
    """A char-level tokenizer (BPE with no merges); returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left"
    )
    fast.save_pretrained(model_dir)
    return len(vocab)


def model_config(family: str, vocab_size: int, eos_token_id: int):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
        max_position_embeddings=128, eos_token_id=eos_token_id, tie_word_embeddings=True,
    )
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "qwen2":  # q/k/v carry biases
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common, attention_bias=False)


def build_model_dir(root: Path, family: str) -> Path:
    from transformers import AutoModelForCausalLM

    model_dir = root / family
    model_dir.mkdir(parents=True)
    vocab_size = build_tokenizer(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(family, vocab_size, vocab_size - 1))
    model.save_pretrained(model_dir)
    return model_dir


def build_peft_adapter(model_dir: Path, out_dir: Path, rank: int, alpha: float, seed: int,
                       targets: tuple[str, ...] = SIGNATURE.target_modules) -> Path:
    """A PEFT adapter with random nonzero A and B, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
    peft_model = get_peft_model(base, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_reference(model_dir: Path, adapter_dir: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


@torch.no_grad()
def next_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0, -1]


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        token = int(next_logits(model, tokens).argmax())
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def qwen3_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model_dir = build_model_dir(root, "qwen3")
    adapters = [
        build_peft_adapter(model_dir, root / f"adapter{i}", rank, alpha, seed=10 + i)
        for i, (rank, alpha) in enumerate(ADAPTER_SHAPES)
    ]
    return model_dir, adapters


@pytest.fixture
async def engine(qwen3_setup):
    model_dir, _ = qwen3_setup
    engine = TorchEngine(model_dir, SIGNATURE, max_rows=32, max_loras=4, device="cpu")
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
async def engine_no_eos(qwen3_setup):
    """Rows stop only at max_tokens: a request surely outlives what the test does meanwhile."""
    model_dir, _ = qwen3_setup
    engine = TorchEngine(model_dir, SIGNATURE, max_rows=32, max_loras=4, device="cpu", ignore_eos=True)
    await engine.start()
    yield engine
    await engine.close()


async def wait_running(engine: TorchEngine, task: asyncio.Task) -> None:
    while engine.stats().running_rows == 0:
        assert not task.done()
        await asyncio.sleep(0.001)


async def register_all(engine: TorchEngine, adapters: list[Path]) -> list[AdapterKey]:
    keys = [AdapterKey(f"tenant{i}", 1) for i in range(len(adapters))]
    for key, path in zip(keys, adapters, strict=True):
        await engine.register_adapter(key, path=path)
    return keys


def prompt_ids(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


# ---------------------------------------------------------------- (1) logits


@pytest.mark.parametrize(
    ("family", "segments"),
    [("qwen3", True), ("qwen3", False), ("qwen2", True), ("llama", True)],
    ids=["qwen3-sgmv", "qwen3-bgmv", "qwen2-sgmv", "llama-sgmv"],
)
def test_mixed_batch_logits_match_peft_single_adapter(tmp_path, qwen3_setup, family, segments):
    if family == "qwen3":
        model_dir, adapters = qwen3_setup
    else:
        model_dir = build_model_dir(tmp_path, family)
        adapters = [
            build_peft_adapter(model_dir, tmp_path / f"a{i}", rank, alpha, seed=20 + i)
            for i, (rank, alpha) in enumerate(ADAPTER_SHAPES)
        ]
    runner = ModelRunner(model_dir, SIGNATURE, max_rows=16, max_loras=4, device="cpu")
    runner.use_segments = segments  # decode rows grouped by adapter (SGMV) or gathered per row (BGMV)
    for slot, path in enumerate(adapters, start=1):
        runner.write_slot(slot, runner.prepare(path, None))
    references = [peft_reference(model_dir, None)] + [peft_reference(model_dir, p) for p in adapters]

    # prompts of different lengths on adapters 1..4 and the base (slot 0); two
    # prompts run as two rows each (n=2 shares the prompt's keys/values)
    slots, copies = [1, 2, 3, 4, 0], [2, 1, 1, 2, 1]
    prompts = [prompt_ids(t) for t in ("12+34=", "abc", "hello world", "7*8=", "(x)")]
    with torch.inference_mode():
        logits_B_V = runner.prefill(prompts, slots, copies, reserve_len=40)
        sequences = [list(p) for p, c in zip(prompts, copies, strict=True) for _ in range(c)]
        slots = [s for s, c in zip(slots, copies, strict=True) for _ in range(c)]
        check_rows(logits_B_V, sequences, slots, references)
        for _ in range(3):
            logits_B_V = decode_greedy(runner, logits_B_V, sequences)
            check_rows(logits_B_V, sequences, slots, references)
        # a row leaves and a newcomer (adapter 2) joins: the others are unaffected
        order = runner.remove_rows([1]).tolist()
        sequences, slots = [sequences[i] for i in order], [slots[i] for i in order]
        kept_logits = logits_B_V.index_select(0, torch.tensor(order))
        new_logits = runner.prefill([prompt_ids("zz top")], [2], [1], reserve_len=40)
        sequences.append(prompt_ids("zz top"))
        slots.append(2)
        logits_B_V = torch.cat([kept_logits, new_logits])
        for _ in range(3):
            logits_B_V = decode_greedy(runner, logits_B_V, sequences)
            check_rows(logits_B_V, sequences, slots, references)

    base_logits = next_logits(references[0], sequences[0])
    adapted_logits = next_logits(references[slots[0]], sequences[0])
    assert (base_logits - adapted_logits).abs().max() > 0.05, "the test adapters must change the logits"


# (rank, lora_alpha, targets) of adapters of their own shapes, served together by a rank-8 deployment
OWN_SHAPES = (
    (2, 6.0, ("q_proj", "v_proj")),
    (4, 8.0, ("gate_proj", "up_proj", "down_proj")),
    (1, 3.0, ("o_proj", "k_proj", "up_proj")),
    (8, 16.0, SIGNATURE.target_modules),
)


@pytest.mark.parametrize("segments", [True, False], ids=["sgmv", "bgmv"])
def test_ranks_and_target_subsets_of_their_own_match_peft_in_one_batch(tmp_path, qwen3_setup, segments):
    model_dir, _ = qwen3_setup
    adapters = [build_peft_adapter(model_dir, tmp_path / f"own{i}", rank, alpha, seed=30 + i, targets=targets)
                for i, (rank, alpha, targets) in enumerate(OWN_SHAPES)]
    runner = ModelRunner(model_dir, SIGNATURE, max_rows=8, max_loras=4, device="cpu")
    runner.use_segments = segments
    for slot, path in enumerate(adapters, start=1):
        runner.write_slot(slot, runner.prepare(path, None))
    references = [peft_reference(model_dir, None)] + [peft_reference(model_dir, p) for p in adapters]
    slots = [1, 2, 3, 4, 0, 1]
    sequences = [prompt_ids(t) for t in ("12+34=", "abc", "hello", "7*8=", "(x)", "q?")]
    with torch.inference_mode():
        logits_B_V = runner.prefill([list(s) for s in sequences], slots, [1] * len(slots), reserve_len=24)
        check_rows(logits_B_V, sequences, slots, references)
        for _ in range(3):
            logits_B_V = decode_greedy(runner, logits_B_V, sequences)
            check_rows(logits_B_V, sequences, slots, references)
    for slot in range(1, len(OWN_SHAPES) + 1):  # each adapter changes what the base would say
        base, adapted = next_logits(references[0], sequences[4]), next_logits(references[slot], sequences[4])
        assert (base - adapted).abs().max() > 0.01, OWN_SHAPES[slot - 1]


def decode_greedy(runner: ModelRunner, logits_B_V: torch.Tensor, sequences: list[list[int]]) -> torch.Tensor:
    tokens_B = logits_B_V.argmax(-1)
    for sequence, token in zip(sequences, tokens_B.tolist(), strict=True):
        sequence.append(token)
    return runner.decode(tokens_B)


def check_rows(logits_B_V, sequences, slots, references) -> None:
    for row, (sequence, slot) in enumerate(zip(sequences, slots, strict=True)):
        expected = next_logits(references[slot], sequence)
        torch.testing.assert_close(logits_B_V[row], expected, atol=LOGITS_ATOL, rtol=0)


# ---------------------------------------------------------------- (2) greedy


async def test_mixed_batch_greedy_equals_separate_runs(engine, qwen3_setup):
    model_dir, adapters = qwen3_setup
    keys = await register_all(engine, adapters)
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=10)
    jobs = [(prompt_ids(f"{i}{i}+{i}="), key) for i, key in enumerate(keys + [None])]

    mixed = await asyncio.gather(*[engine.generate(p, k, greedy) for p, k in jobs])
    separate = [await engine.generate(p, k, greedy) for p, k in jobs]

    for m, s, (_, key) in zip(mixed, separate, jobs, strict=True):
        assert m.adapter == key
        assert [x.token_ids for x in m.samples] == [x.token_ids for x in s.samples]
        assert m.samples[0].token_ids == m.samples[1].token_ids  # greedy: n copies agree
    # the mixed run shared decode steps across all five tenants (base included)
    assert max(len(t) for t in engine.stats().step_tenants) == 5
    # and equals PEFT's own greedy decoding with the one adapter loaded
    eos = {engine.tokenizer().eos_token_id}
    for result, (prompt, key) in zip(mixed[:2], jobs[:2], strict=True):
        reference = peft_reference(model_dir, adapters[keys.index(key)])
        assert result.samples[0].token_ids == greedy_reference(reference, prompt, 10, eos)


async def test_logprobs_are_under_the_temperature_scaled_policy(engine, qwen3_setup):
    model_dir, adapters = qwen3_setup
    key = (await register_all(engine, adapters[:1]))[0]
    prompt = prompt_ids("3+4=")
    result = await engine.generate(prompt, key, SamplingParams(n=3, temperature=0.7, max_tokens=8, seed=5))
    reference = peft_reference(model_dir, adapters[0])
    for sample in result.samples:
        assert len(sample.logprobs) == len(sample.token_ids)
        sequence = list(prompt)
        for token, logprob in zip(sample.token_ids, sample.logprobs, strict=True):
            expected = torch.log_softmax(next_logits(reference, sequence) / 0.7, -1)[token]
            assert logprob == pytest.approx(float(expected), abs=LOGITS_ATOL)
            sequence.append(token)


# ---------------------------------------------------------------- (3) hot swap


async def test_new_version_loads_while_decoding(engine_no_eos, qwen3_setup):
    engine, (_, adapters) = engine_no_eos, qwen3_setup
    v1, v2 = AdapterKey("tenant", 1), AdapterKey("tenant", 2)
    await engine.register_adapter(v1, path=adapters[0])
    prompt, long_greedy = prompt_ids("9*9="), SamplingParams(temperature=0.0, max_tokens=100)
    in_flight = asyncio.create_task(engine.generate(prompt, v1, long_greedy), name="in_flight")
    while engine.stats().decode_steps < 2:
        await asyncio.sleep(0.001)

    # The loader thread waits until it has seen 3 more decode steps: if decode
    # paused for a load, this would never happen and the load would fail.
    observed = _slow_loader(engine, extra_steps=3)
    await engine.register_adapter(v2, path=adapters[2])
    assert observed["steps_seen_during_load"] >= 3
    assert not in_flight.done(), "the in-flight request kept running through the load"
    assert engine.stats().running_rows == 1

    new = await engine.generate(prompt, v2, SamplingParams(temperature=0.0, max_tokens=100))
    old = await in_flight
    assert old.adapter == v1 and new.adapter == v2
    # references: each version alone, run after the swap
    ref_v1 = await engine.generate(prompt, v1, long_greedy)
    ref_v2 = await engine.generate(prompt, v2, long_greedy)
    assert old.samples[0].token_ids == ref_v1.samples[0].token_ids
    assert new.samples[0].token_ids == ref_v2.samples[0].token_ids
    assert old.samples[0].token_ids != new.samples[0].token_ids


def _slow_loader(engine: TorchEngine, extra_steps: int) -> dict:
    """Wrap the engine's adapter reader so it returns only after the engine
    made ``extra_steps`` more decode steps (counted, not timed)."""
    runner, observed = engine._runner, {}
    real_prepare = runner.prepare

    def prepare(path, tensors):
        start = engine.stats().decode_steps
        done = threading.Event()
        for _ in range(int(LOAD_OBSERVE_TIMEOUT_S * 1000)):
            if engine.stats().decode_steps >= start + extra_steps:
                done.set()
                break
            done.wait(0.001)
        observed["steps_seen_during_load"] = engine.stats().decode_steps - start
        runner.prepare = real_prepare
        return real_prepare(path, tensors)

    runner.prepare = prepare
    return observed


async def test_retired_version_finishes_in_flight_rows_then_frees_its_slot(engine_no_eos, qwen3_setup):
    engine, (_, adapters) = engine_no_eos, qwen3_setup
    key = (await register_all(engine, adapters[:1]))[0]
    in_flight = asyncio.create_task(
        engine.generate(prompt_ids("1+1="), key, SamplingParams(temperature=0.0, max_tokens=100)),
        name="in_flight",
    )
    await wait_running(engine, in_flight)
    await engine.retire_adapter(key)
    assert engine.stats().adapter_retires == 0, "the slot stays while a row uses it"
    assert not engine.has_adapter(key)
    with pytest.raises(AdapterNotLoaded):
        await engine.generate(prompt_ids("1+1="), key, SamplingParams())
    result = await in_flight
    assert result.adapter == key and result.samples[0].token_ids
    assert engine.stats().adapter_retires == 1


async def test_full_slots_evict_least_recently_used_idle_key(qwen3_setup):
    model_dir, adapters = qwen3_setup
    engine = TorchEngine(model_dir, SIGNATURE, max_rows=8, max_loras=2, device="cpu")
    await engine.start()
    try:
        a, b, c = (AdapterKey(t, 1) for t in "abc")
        await engine.register_adapter(a, path=adapters[0])
        await engine.register_adapter(b, path=adapters[1])
        await engine.generate(prompt_ids("1"), a, SamplingParams(max_tokens=1))  # a is now the fresher
        await engine.register_adapter(c, path=adapters[2])
        assert engine.has_adapter(a) and engine.has_adapter(c) and not engine.has_adapter(b)
        with pytest.raises(AdapterNotLoaded):
            await engine.generate(prompt_ids("1"), b, SamplingParams())
    finally:
        await engine.close()


# ---------------------------------------------------------------- (4) errors, sampling


async def test_unknown_adapter_raises_adapter_not_loaded(engine):
    with pytest.raises(AdapterNotLoaded, match="ghost@v3"):
        await engine.generate(prompt_ids("1+1="), AdapterKey("ghost", 3), SamplingParams())


async def test_bad_adapter_directories_raise_engine_error_with_reason(engine, qwen3_setup, tmp_path):
    from safetensors.torch import load_file

    _, adapters = qwen3_setup
    key = AdapterKey("bad", 1)
    with pytest.raises(EngineError, match="does not exist"):
        await engine.register_adapter(key, path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="not a PEFT adapter"):
        await engine.register_adapter(key, path=tmp_path / "empty")

    # a target module outside the deployment's signature
    narrow = TorchEngine(engine.model_dir, LoraSignature(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj")),
                         max_rows=4, max_loras=1, device="cpu")
    await narrow.start()
    try:
        with pytest.raises(EngineError, match="not in the deployment's signature"):
            await narrow.register_adapter(key, path=adapters[0])
    finally:
        await narrow.close()

    # rank above the signature's, and a wrong shape (in-memory tensors)
    small = TorchEngine(engine.model_dir, LoraSignature(rank=4, alpha=8.0), max_rows=4, max_loras=1, device="cpu")
    await small.start()
    try:
        with pytest.raises(EngineError, match="exceeds the signature's rank"):
            await small.register_adapter(key, path=adapters[0])
    finally:
        await small.close()
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    wrong = {name.format("A"): torch.ones(8, 63), name.format("B"): torch.ones(64, 8)}
    with pytest.raises(EngineError, match="do not fit the model"):
        await engine.register_adapter(key, tensors=wrong)
    poisoned = load_file(adapters[0] / "adapter_model.safetensors")
    poisoned[name.format("B").replace("q_proj", "v_proj").replace("layers.0", "layers.1")][3, 2] = float("nan")
    with pytest.raises(EngineError, match="layer 1 v_proj: non-finite values"):
        await engine.register_adapter(key, tensors=poisoned)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EngineError, match="not a valid safetensors file"):
        await engine.register_adapter(key, path=corrupt)
    assert not engine.has_adapter(key)


async def test_in_memory_tensors_equal_the_same_adapter_from_disk(engine, qwen3_setup):
    from safetensors.torch import load_file

    _, adapters = qwen3_setup
    disk, memory = AdapterKey("disk", 1), AdapterKey("memory", 1)
    await engine.register_adapter(disk, path=adapters[0])  # rank 8, alpha 16 = the signature's scaling
    await engine.register_adapter(memory, tensors=load_file(adapters[0] / "adapter_model.safetensors"))
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    a = await engine.generate(prompt_ids("5+5="), disk, greedy)
    b = await engine.generate(prompt_ids("5+5="), memory, greedy)
    assert a.samples[0].token_ids == b.samples[0].token_ids


async def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, qwen3_setup):
    _, adapters = qwen3_setup
    keys = await register_all(engine, adapters[:2])
    prompt = prompt_ids("12+7=")
    params = SamplingParams(n=4, temperature=1.0, top_k=20, top_p=0.9, max_tokens=12, seed=1234)
    alone = await engine.generate(prompt, keys[0], params)
    noise = SamplingParams(n=6, temperature=1.0, max_tokens=12)
    crowded, _ = await asyncio.gather(
        engine.generate(prompt, keys[0], params), engine.generate(prompt_ids("xyz"), keys[1], noise)
    )
    other_seed = await engine.generate(prompt, keys[0], SamplingParams(**{**_fields(params), "seed": 99}))
    tokens = lambda r: [s.token_ids for s in r.samples]  # noqa: E731
    assert tokens(alone) == tokens(crowded)
    flat = lambda r: [lp for s in r.samples for lp in s.logprobs]  # noqa: E731
    assert flat(alone) == pytest.approx(flat(crowded), abs=1e-5)
    assert tokens(other_seed) != tokens(alone)
    assert len({tuple(t) for t in tokens(alone)}) > 1, "the n samples of one request differ"
    assert all(lp <= 0.0 for s in alone.samples for lp in s.logprobs)


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__struct_fields__}


async def test_cancelling_generate_aborts_its_rows(engine_no_eos):
    engine = engine_no_eos
    task = asyncio.create_task(
        engine.generate(prompt_ids("1"), None, SamplingParams(n=4, max_tokens=120)), name="to_cancel"
    )
    await wait_running(engine, task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await engine.generate(prompt_ids("2"), None, SamplingParams(temperature=0.0, max_tokens=3))
    assert result.samples[0].token_ids
    assert engine.stats().running_rows == 0


async def test_result_timings_and_invalid_requests(engine):
    result = await engine.generate(prompt_ids("4+4="), None, SamplingParams(n=2, temperature=0.0, max_tokens=5))
    assert result.queue_wait_s >= 0 and result.time_to_first_token_s >= result.queue_wait_s
    assert result.decode_s >= 0
    assert all(s.finish_reason in ("stop", "length") for s in result.samples)
    with pytest.raises(EngineError, match="empty prompt"):
        await engine.generate([], None, SamplingParams())
    with pytest.raises(EngineError, match="n must be"):
        await engine.generate([1], None, SamplingParams(n=1000))
    assert engine.capacity_rows == 32
