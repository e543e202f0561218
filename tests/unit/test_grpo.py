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


def test_build_batch_aligns_completion_mask_and_behaviour_logprobs():
    batch = grpo.build_batch([
        grpo.SequenceExample([5, 6, 7], [8, 9], [-0.5, -0.25], advantage=1.0),
        grpo.SequenceExample([5], [10, 11, 12, 13], [-1.0, -2.0, -3.0, -4.0], advantage=-1.0),
    ], pad_id=0)
    assert batch.input_ids_B_T.tolist() == [[5, 6, 7, 8], [5, 10, 11, 12]]
    assert batch.target_ids_B_T.tolist() == [[6, 7, 8, 9], [10, 11, 12, 13]]
    assert batch.completion_mask_B_T.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.behaviour_logprobs_B_T.tolist() == [[0, 0, -0.5, -0.25], [-1.0, -2.0, -3.0, -4.0]]
    assert batch.advantages_B.tolist() == [1.0, -1.0]
    assert batch.num_tokens == 6


def test_build_batch_pads_right_and_rows_trims_padding():
    batch = grpo.build_batch([
        grpo.SequenceExample([1, 2], [3], [-0.1], advantage=0.5),
        grpo.SequenceExample([1, 2, 3, 4], [5, 6], [-0.2, -0.3], advantage=-0.5),
    ], pad_id=0)
    assert batch.attention_mask_B_T.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.completion_mask_B_T[0].tolist() == [0, 1, 0, 0, 0]
    first = batch.rows(0, 1)
    assert first.input_ids_B_T.shape == (1, 2) and first.num_tokens == 1


def test_build_batch_rejects_misaligned_logprobs():
    with pytest.raises(ValueError, match="behaviour logprobs"):
        grpo.build_batch([grpo.SequenceExample([1], [2, 3], [-0.1], advantage=1.0)])


def test_token_logprobs_match_log_softmax():
    logits_B_T_V = torch.randn(2, 3, 7)
    target_ids_B_T = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits_B_T_V, -1).gather(-1, target_ids_B_T[..., None])[..., 0]
    assert torch.allclose(grpo.token_logprobs(logits_B_T_V, target_ids_B_T), expected, atol=1e-6)
    hot = torch.log_softmax(logits_B_T_V / 0.5, -1).gather(-1, target_ids_B_T[..., None])[..., 0]
    assert torch.allclose(grpo.token_logprobs(logits_B_T_V, target_ids_B_T, temperature=0.5), hot, atol=1e-6)


# ---------------------------------------------------------------- the loss


def _loss_and_grad(logprobs, behaviour, advantages, mask, clip_eps=0.2, **kwargs):
    logprobs = logprobs.clone().requires_grad_(True)
    terms = grpo.policy_loss(logprobs, behaviour, advantages, mask, clip_eps, **kwargs)
    terms.loss.backward()
    return terms, logprobs.grad


def test_on_policy_loss_is_the_policy_gradient():
    logprobs_B_T = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    mask_B_T = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages_B = torch.tensor([2.0, -1.0])
    terms, grad_B_T = _loss_and_grad(logprobs_B_T, logprobs_B_T.clone(), advantages_B, mask_B_T)
    # Ratio 1: loss = -mean over tokens of A, gradient = -A / num_tokens on completion tokens.
    assert terms.num_tokens == 5
    assert terms.loss.item() == pytest.approx(-(2 * 2.0 + 3 * -1.0) / 5)
    expected = -advantages_B[:, None] * mask_B_T / 5
    assert torch.allclose(grad_B_T, expected)
    assert terms.clip_fraction == 0.0


def test_clipping_stops_gradient_only_beyond_the_trust_region_in_the_advantage_direction():
    behaviour_B_T = torch.zeros(4, 1)
    ratio_B = torch.tensor([1.5, 0.5, 0.5, 1.5])  # outside [0.8, 1.2]
    logprobs_B_T = torch.log(ratio_B)[:, None]
    advantages_B = torch.tensor([1.0, 1.0, -1.0, -1.0])
    terms, grad_B_T = _loss_and_grad(logprobs_B_T, behaviour_B_T, advantages_B, torch.ones(4, 1))
    grad_B = grad_B_T[:, 0]
    # Positive advantage, ratio already high: clipped (no push further); ratio low: still pushed up.
    assert grad_B[0] == 0.0 and grad_B[1] < 0.0
    # Negative advantage, ratio already low: clipped; ratio high: still pushed down.
    assert grad_B[2] == 0.0 and grad_B[3] > 0.0
    assert terms.clip_fraction == pytest.approx(1.0)


def test_importance_ratio_weights_off_policy_tokens():
    behaviour_B_T = torch.tensor([[-1.0]])
    logprobs_B_T = torch.tensor([[-1.1]])  # ratio exp(-0.1), inside the clip range
    terms, grad_B_T = _loss_and_grad(logprobs_B_T, behaviour_B_T, torch.tensor([1.0]), torch.ones(1, 1))
    assert grad_B_T.item() == pytest.approx(-math.exp(-0.1), rel=1e-5)
    assert terms.loss.item() == pytest.approx(-math.exp(-0.1), rel=1e-5)


def test_prompt_and_padding_tokens_do_not_count():
    mask_B_T = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    behaviour_B_T = torch.tensor([[0.0, -1.0, -1.0, 0.0]])
    base_B_T = torch.tensor([[-3.0, -1.0, -1.2, -2.0]])
    changed_B_T = base_B_T.clone()
    changed_B_T[0, 0], changed_B_T[0, 3] = 40.0, -40.0  # wild values off the completion
    terms_a, grad_a = _loss_and_grad(base_B_T, behaviour_B_T, torch.tensor([1.0]), mask_B_T)
    terms_b, grad_b = _loss_and_grad(changed_B_T, behaviour_B_T, torch.tensor([1.0]), mask_B_T)
    assert terms_a.loss.item() == terms_b.loss.item()
    assert grad_a[0, 0] == 0.0 and grad_a[0, 3] == 0.0 and torch.isfinite(grad_b).all()
    assert terms_a.num_tokens == 2


def test_nan_behaviour_logprob_makes_the_loss_non_finite():
    behaviour_B_T = torch.tensor([[-1.0, float("nan")]])
    terms = grpo.policy_loss(torch.tensor([[-1.0, -1.0]]), behaviour_B_T, torch.tensor([1.0]),
                             torch.ones(1, 2), clip_eps=0.2)
    assert not grpo.is_finite(terms.loss)


def test_micro_batches_add_up_to_the_full_batch_loss():
    torch.manual_seed(0)
    logprobs_B_T = -torch.rand(4, 5)
    behaviour_B_T = logprobs_B_T + 0.05 * torch.randn(4, 5)
    advantages_B = torch.randn(4)
    mask_B_T = (torch.rand(4, 5) > 0.3).float()
    total = int(mask_B_T.sum())
    full = grpo.policy_loss(logprobs_B_T, behaviour_B_T, advantages_B, mask_B_T, 0.2).loss
    halves = sum(grpo.policy_loss(logprobs_B_T[s], behaviour_B_T[s], advantages_B[s], mask_B_T[s], 0.2,
                                  total_tokens=total).loss for s in (slice(0, 2), slice(2, 4)))
    assert halves.item() == pytest.approx(full.item(), rel=1e-6)


# ---------------------------------------------------------------- KL


def test_kl_estimate_is_zero_only_when_policies_agree():
    logprobs_B_T = torch.tensor([[-1.0, -2.0]])
    assert grpo.kl_to_reference(logprobs_B_T, logprobs_B_T).abs().max() == 0.0
    assert (grpo.kl_to_reference(logprobs_B_T, logprobs_B_T - 0.3) > 0).all()
    assert (grpo.kl_to_reference(logprobs_B_T, logprobs_B_T + 0.3) > 0).all()


def _tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(Qwen3ForCausalLM(config), lora).eval()


def test_kl_to_base_is_zero_for_a_fresh_adapter_and_positive_after_a_change():
    model = _tiny_peft_model()
    batch = grpo.build_batch([grpo.SequenceExample([1, 2, 3], [4, 5, 6], [-1.0, -1.0, -1.0], 1.0)])
    logprobs_B_T = grpo.model_logprobs(model, batch)
    ref_B_T = grpo.reference_logprobs(model, batch)
    assert not ref_B_T.requires_grad
    terms = grpo.policy_loss(logprobs_B_T, batch.behaviour_logprobs_B_T, batch.advantages_B,
                             batch.completion_mask_B_T, 0.2, ref_B_T, kl_coef=1.0)
    assert terms.kl == 0.0  # lora_B == 0: the adapter is exactly the base model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    moved_B_T = grpo.model_logprobs(model, batch)
    terms = grpo.policy_loss(moved_B_T, batch.behaviour_logprobs_B_T, batch.advantages_B,
                             batch.completion_mask_B_T, 0.2, grpo.reference_logprobs(model, batch), kl_coef=1.0)
    assert terms.kl > 0.0
    assert torch.equal(grpo.reference_logprobs(model, batch), ref_B_T)  # disabling the adapter gives the base back
