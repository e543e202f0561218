"""GRPO pieces: advantages, batching, the clipped loss, masking, KL."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer import grpo

# ---------------------------------------------------------------- advantages


def test_advantage_is_reward_minus_group_mean():
    advantages_N = grpo.group_advantage(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]), normalize_std=False)
    assert torch.allclose(advantages_N, torch.tensor([0.4, -0.6, -0.6, 0.4, 0.4]))


def test_std_normalisation_gives_unit_spread():
    rewards_N = torch.tensor([3.0, 1.0, 0.0, 2.0])
    advantages_N = grpo.group_advantage(rewards_N, normalize_std=True)
    assert advantages_N.mean().abs() < 1e-6
    assert advantages_N.std(unbiased=False) == pytest.approx(1.0, rel=1e-4)
    assert torch.argsort(advantages_N).tolist() == torch.argsort(rewards_N).tolist()


def test_identical_reward_groups_are_skipped_and_counted():
    result = grpo.group_advantages([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5], [0.0]], normalize_std=True)
    assert result.skipped_groups == 3
    assert result.advantages[0] is None and result.advantages[2] is None and result.advantages[3] is None
    assert result.advantages[1] is not None and result.advantages[1][1] > 0


def test_nan_reward_is_not_silently_skipped():
    advantages_N = grpo.group_advantage(torch.tensor([1.0, float("nan"), 0.0]), normalize_std=False)
    assert advantages_N is not None and torch.isnan(advantages_N).any()


# ---------------------------------------------------------------- batching


def test_build_batch_packs_completions_behind_their_shared_prompt():
    batch = grpo.build_batch([
        grpo.SequenceExample([5, 6, 7], [8, 9], [-0.5, -0.25], advantage=1.0),
        grpo.SequenceExample([5], [10, 11, 12], [-1.0, -2.0, -3.0], advantage=-1.0),
        grpo.SequenceExample([5, 6, 7], [20, 21, 22], [-0.1, -0.2, -0.3], advantage=-2.0),
    ], pad_id=0)
    # Row 0: prompt 5 6 7, then 8 (9 is only a target), then 20 21; row 1: prompt 5, then 10 11.
    assert batch.input_ids_B_L.tolist() == [[5, 6, 7, 8, 20, 21], [5, 10, 11, 0, 0, 0]]
    assert batch.position_ids_B_L.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 2, 0, 0, 0]]
    assert batch.row_lengths == [6, 3] and batch.row_offsets == [0, 5, 8]
    assert batch.target_K.tolist() == [8, 9, 20, 21, 22, 10, 11, 12]
    assert batch.row_K.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # The first token of each completion is predicted at the prompt's last position.
    assert batch.position_K.tolist() == [2, 3, 2, 4, 5, 0, 1, 2]
    assert torch.equal(batch.behaviour_logprobs_K, torch.tensor([-0.5, -0.25, -0.1, -0.2, -0.3, -1.0, -2.0, -3.0]))
    assert batch.advantages_K.tolist() == [1.0, 1.0, -2.0, -2.0, -2.0, -1.0, -1.0, -1.0]
    assert batch.num_tokens == 8
    attend = batch.attend_B_L_L[0].int().tolist()
    assert attend[3] == [1, 1, 1, 1, 0, 0]  # completion 1 sees the prompt and itself
    assert attend[4] == [1, 1, 1, 0, 1, 0]  # completion 2 sees the prompt, not completion 1
    assert attend[5] == [1, 1, 1, 0, 1, 1]
    assert batch.attend_B_L_L[1, 4].int().tolist() == [0, 0, 0, 0, 1, 0]  # padding sees itself only


def test_rows_and_micro_batches_keep_every_token_once():
    examples = [grpo.SequenceExample([p], [p + 1] * (p % 3 + 1), [-0.5] * (p % 3 + 1), advantage=float(p))
                for p in range(1, 8)]
    batch = grpo.build_batch(examples)
    first = batch.rows(0, 1)
    assert first.input_ids_B_L.shape == (1, 2) and first.num_tokens == 2
    micro = batch.micro_batches(max_padded_tokens=6)
    assert len(micro) > 1 and all(m.num_rows * max(m.row_lengths) <= 6 for m in micro)
    assert torch.equal(torch.cat([m.target_K for m in micro]), batch.target_K)
    assert torch.equal(torch.cat([m.advantages_K for m in micro]), batch.advantages_K)
    assert all(int(m.row_K.max()) < m.num_rows for m in micro)
    assert len(batch.micro_batches(max_padded_tokens=1)) == batch.num_rows  # a row longer than the budget


def test_build_batch_rejects_misaligned_logprobs_and_empty_parts():
    with pytest.raises(ValueError, match="behaviour logprobs"):
        grpo.build_batch([grpo.SequenceExample([1], [2, 3], [-0.1], advantage=1.0)])
    with pytest.raises(ValueError, match="prompt token"):
        grpo.build_batch([grpo.SequenceExample([], [2], [-0.1], advantage=1.0)])
    with pytest.raises(ValueError, match="completion token"):
        grpo.build_batch([grpo.SequenceExample([1], [], [], advantage=1.0)])


def test_token_logprobs_match_log_softmax():
    logits_K_V = torch.randn(6, 7)
    target_K = torch.randint(0, 7, (6,))
    expected = torch.log_softmax(logits_K_V, -1).gather(-1, target_K[:, None])[:, 0]
    assert torch.allclose(grpo.token_logprobs(logits_K_V, target_K), expected, atol=1e-6)
    hot = torch.log_softmax(logits_K_V / 0.5, -1).gather(-1, target_K[:, None])[:, 0]
    assert torch.allclose(grpo.token_logprobs(logits_K_V, target_K, temperature=0.5), hot, atol=1e-6)


def test_packed_logprobs_and_gradients_equal_one_sequence_at_a_time():
    """The packing is exact: each completion's log-probs (and the gradient of
    their sum) are those of ``prompt + completion`` run alone."""
    model = _tiny_peft_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)  # a trained-looking adapter, not the base
    examples = [
        grpo.SequenceExample([1, 2, 3], [4, 5, 6, 7], [-1.0] * 4, 1.0),
        grpo.SequenceExample([1, 2, 3], [8], [-1.0], -0.5),
        grpo.SequenceExample([9, 10], [11, 12], [-1.0] * 2, 0.25),
        grpo.SequenceExample([1, 2, 3], [13, 14], [-1.0] * 2, -0.75),
    ]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    batch = grpo.build_batch(examples)
    packed_K = grpo.model_logprobs(model, batch, temperature=0.7)
    packed_grads = torch.autograd.grad((packed_K * batch.advantages_K).sum(), lora)
    expected, alone_sum = {}, 0.0
    for example in examples:
        sequence = torch.tensor([list(example.prompt_ids) + list(example.completion_ids)])
        logits_T_V = model(input_ids=sequence[:, :-1]).logits[0]
        prompt_len = len(example.prompt_ids)
        alone = grpo.token_logprobs(logits_T_V[prompt_len - 1:], sequence[0, prompt_len:], 0.7)
        expected[tuple(example.completion_ids)] = alone
        alone_sum = alone_sum + (alone * example.advantage).sum()
    alone_grads = torch.autograd.grad(alone_sum, lora)
    starts = [0, 4, 5, 7]  # packed order: prompt [1,2,3] completions, then prompt [9,10]
    order = [examples[0], examples[1], examples[3], examples[2]]
    for start, example in zip(starts, order, strict=True):
        got = packed_K[start:start + len(example.completion_ids)]
        assert torch.allclose(got, expected[tuple(example.completion_ids)], atol=1e-5)
    for packed, alone in zip(packed_grads, alone_grads, strict=True):
        assert torch.allclose(packed, alone, atol=1e-5)


# ---------------------------------------------------------------- the loss


def _loss_and_grad(logprobs, behaviour, advantages, clip_eps=0.2, **kwargs):
    logprobs = logprobs.clone().requires_grad_(True)
    terms = grpo.policy_loss(logprobs, behaviour, advantages, clip_eps, **kwargs)
    terms.loss.backward()
    return terms, logprobs.grad


def test_on_policy_loss_is_the_policy_gradient():
    logprobs_K = torch.tensor([-1.0, -2.0, -0.3, -0.7, -1.1])
    advantages_K = torch.tensor([2.0, 2.0, -1.0, -1.0, -1.0])
    terms, grad_K = _loss_and_grad(logprobs_K, logprobs_K.clone(), advantages_K)
    # Ratio 1: loss = -mean over tokens of A, gradient = -A / num_tokens.
    assert terms.num_tokens == 5
    assert terms.loss.item() == pytest.approx(-(2 * 2.0 + 3 * -1.0) / 5)
    assert torch.allclose(grad_K, -advantages_K / 5)
    assert terms.clip_fraction == 0.0


def test_clipping_stops_gradient_only_beyond_the_trust_region_in_the_advantage_direction():
    behaviour_K = torch.zeros(4)
    ratio_K = torch.tensor([1.5, 0.5, 0.5, 1.5])  # outside [0.8, 1.2]
    advantages_K = torch.tensor([1.0, 1.0, -1.0, -1.0])
    terms, grad_K = _loss_and_grad(torch.log(ratio_K), behaviour_K, advantages_K)
    # Positive advantage, ratio already high: clipped (no push further); ratio low: still pushed up.
    assert grad_K[0] == 0.0 and grad_K[1] < 0.0
    # Negative advantage, ratio already low: clipped; ratio high: still pushed down.
    assert grad_K[2] == 0.0 and grad_K[3] > 0.0
    assert terms.clip_fraction == pytest.approx(1.0)


def test_importance_ratio_weights_off_policy_tokens():
    behaviour_K = torch.tensor([-1.0])
    logprobs_K = torch.tensor([-1.1])  # ratio exp(-0.1), inside the clip range
    terms, grad_K = _loss_and_grad(logprobs_K, behaviour_K, torch.tensor([1.0]))
    assert grad_K.item() == pytest.approx(-math.exp(-0.1), rel=1e-5)
    assert terms.loss.item() == pytest.approx(-math.exp(-0.1), rel=1e-5)


def test_nan_behaviour_logprob_makes_the_loss_non_finite():
    terms = grpo.policy_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, float("nan")]),
                             torch.tensor([1.0, 1.0]), clip_eps=0.2)
    assert not grpo.is_finite(terms.loss)


def test_micro_batches_add_up_to_the_full_batch_loss():
    torch.manual_seed(0)
    logprobs_K = -torch.rand(12)
    behaviour_K = logprobs_K + 0.05 * torch.randn(12)
    advantages_K = torch.randn(12)
    full = grpo.policy_loss(logprobs_K, behaviour_K, advantages_K, 0.2).loss
    halves = sum(grpo.policy_loss(logprobs_K[s], behaviour_K[s], advantages_K[s], 0.2, total_tokens=12).loss
                 for s in (slice(0, 5), slice(5, 12)))
    assert halves.item() == pytest.approx(full.item(), rel=1e-6)


# ---------------------------------------------------------------- KL


def test_kl_estimate_is_zero_only_when_policies_agree():
    logprobs_K = torch.tensor([-1.0, -2.0])
    assert grpo.kl_to_reference(logprobs_K, logprobs_K).abs().max() == 0.0
    assert (grpo.kl_to_reference(logprobs_K, logprobs_K - 0.3) > 0).all()
    assert (grpo.kl_to_reference(logprobs_K, logprobs_K + 0.3) > 0).all()


def _tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config._attn_implementation = "sdpa"
    return get_peft_model(Qwen3ForCausalLM(config), lora).eval()


def test_kl_to_base_is_zero_for_a_fresh_adapter_and_positive_after_a_change():
    model = _tiny_peft_model()
    batch = grpo.build_batch([grpo.SequenceExample([1, 2, 3], [4, 5, 6], [-1.0, -1.0, -1.0], 1.0)])
    logprobs_K = grpo.model_logprobs(model, batch)
    ref_K = grpo.reference_logprobs(model, batch)
    assert not ref_K.requires_grad
    terms = grpo.policy_loss(logprobs_K, batch.behaviour_logprobs_K, batch.advantages_K, 0.2, ref_K, kl_coef=1.0)
    assert terms.kl == 0.0  # lora_B == 0: the adapter is exactly the base model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    moved_K = grpo.model_logprobs(model, batch)
    terms = grpo.policy_loss(moved_K, batch.behaviour_logprobs_K, batch.advantages_K, 0.2,
                             grpo.reference_logprobs(model, batch), kl_coef=1.0)
    assert terms.kl > 0.0
    assert torch.equal(grpo.reference_logprobs(model, batch), ref_K)  # disabling the adapter gives the base back


def test_groups_with_the_same_prompt_get_rows_of_their_own():
    """A packed row never holds more than one group (the trainer's row budget)."""
    same_prompt = [grpo.SequenceExample([5, 6], [7, 8], [-0.5, -0.5], advantage=1.0, group=g) for g in (0, 1)]
    batch = grpo.build_batch(same_prompt)
    assert batch.input_ids_B_L.tolist() == [[5, 6, 7], [5, 6, 7]]
    assert batch.row_lengths == [3, 3] and batch.num_tokens == 4
