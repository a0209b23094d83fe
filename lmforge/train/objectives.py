"""Every training objective as a loss function: (model, batch) -> (mean loss, tokens in the batch).

The trainer knows nothing about what a batch holds; an objective does. Each
docstring gives the formula; tests/test_objectives.py checks each against a
direct computation of it. Extra settings (label smoothing, a reference or
teacher model, temperatures) are bound with functools.partial by the task.
The token count is what the batch processed (for tokens/s), not only what was scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batches import IGNORE_INDEX


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy: L = -1/N sum_{t: y_t >= 0} log softmax(z_t)[y_t].

    batch = (inputs (B, T), targets (B, T)); targets < 0 are ignored (N counts the others).
    The model fuses the output layer with the loss (`linear_cross_entropy`), so no (B, T, V) logits exist.
    """
    inputs, targets = batch
    return model(inputs, targets=targets), targets.numel()


def chat_sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on assistant tokens only, over rows that pack several conversations.

    L = -1/N sum_{t: y_t != -100} log softmax(z_t)[y_t], with z_t computed attending only inside t's conversation.
    batch: input_ids, targets (B, T) with -100 wherever the next token is not an assistant's,
    segment_ids (B, T) keeping attention inside each conversation.
    """
    loss = model(batch["input_ids"], segment_ids=batch["segment_ids"], targets=batch["targets"])
    return loss, int((batch["segment_ids"] > 0).sum())  # tokens processed (for tokens/s), not only those scored


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """BERT's masked-LM cross-entropy: L = -1/|M| sum_{t in M} log softmax(z_t)[y_t], M = {t: labels_t != -100}.

    batch: input_ids (corrupted), attention_mask, labels (B, T) holding the original token where one was chosen.
    """
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # (B, T, hidden)
    chosen = batch["labels"] != IGNORE_INDEX
    # NOTE: the vocabulary projection runs on the ~15% chosen positions only: most of the work, saved.
    logits = model.mlm_head(hidden[chosen])  # (chosen, vocab)
    return F.cross_entropy(logits.float(), batch["labels"][chosen]), int(batch["attention_mask"].sum())


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from p = softmax(logits): the smallest v with p_0 + ... + p_v > u, inverting the
    cumulative distribution at a given uniform draw u. logits (N, V), uniforms (N,) in [0, 1) -> tokens (N,).

    The draws come with the batch, so a sample is a function of the batch and the weights (exact resume, and
    validation sees the same samples for the same weights).
    """
    cumulative = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)  # (N, V)
    tokens = torch.searchsorted(cumulative, uniforms.float().unsqueeze(-1), right=True).squeeze(-1)  # (N,)
    return tokens.clamp(max=logits.shape[-1] - 1)  # a draw above the rounded total of the probabilities


@dataclass
class ReplacedTokens:
    """The two halves of an ELECTRA step: what the generator predicted and what the discriminator saw and said."""

    generator_logits: torch.Tensor  # (M, V) at the M masked positions
    targets: torch.Tensor  # (M,) the original tokens there
    discriminator_logits: torch.Tensor  # (B, T) > 0 = "replaced"
    replaced: torch.Tensor  # (B, T) bool: the discriminator's input differs from the original text there
    real: torch.Tensor  # (B, T) bool: not padding


def replaced_token_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> ReplacedTokens:
    """The generator fills the masked positions with tokens sampled from its distribution; the discriminator reads
    the result. model: `models.electra.Electra`; batch: as masked_lm_loss's, plus `draws` (B, T), uniform in [0, 1).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    chosen = labels != IGNORE_INDEX  # (B, T)
    hidden = model.generator.hidden_states(input_ids, attention_mask)  # (B, T, generator hidden)
    generator_logits = model.generator.mlm_head(hidden[chosen])  # (M, V)
    # NOTE: sampling is not differentiable and ELECTRA does not try (no REINFORCE): the generator learns from its
    # MLM loss alone, the discriminator from the samples.
    with torch.no_grad():
        sampled = sample_tokens(generator_logits.detach(), batch["draws"][chosen])  # (M,)
    corrupted = input_ids.masked_scatter(chosen, sampled)  # (B, T): elsewhere input_ids are the original tokens
    # A sample that happens to be the original token counts as original, not replaced (the paper, sec. 2).
    replaced = chosen & (corrupted != labels)
    return ReplacedTokens(
        generator_logits=generator_logits,
        targets=labels[chosen],
        discriminator_logits=model.discriminator(corrupted, attention_mask),
        replaced=replaced,
        real=attention_mask.bool(),
    )


def replaced_token_detection_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], discriminator_weight: float = 50.0
) -> tuple[torch.Tensor, int]:
    """ELECTRA (https://arxiv.org/abs/2003.10555, eq. 1): L = L_G + lambda L_D, lambda = discriminator_weight.

    L_G = -1/|M| sum_{t in M} log p_G(x_t | x^masked), the generator's masked-LM loss on the masked positions M;
    x^corrupt_t = x^_t ~ p_G(. | x^masked) for t in M (sampled with batch["draws"], no gradient), x_t elsewhere;
    L_D = -1/N sum_{t real} [r_t log s(D_t) + (1 - r_t) log(1 - s(D_t))] with s the sigmoid, D_t the
    discriminator's logit on x^corrupt, r_t = 1[x^corrupt_t != x_t], N the non-padding tokens.
    """
    outputs = replaced_token_outputs(model, batch)
    generator_loss = F.cross_entropy(outputs.generator_logits.float(), outputs.targets)
    discriminator_loss = F.binary_cross_entropy_with_logits(
        outputs.discriminator_logits.float()[outputs.real], outputs.replaced[outputs.real].float()
    )
    return generator_loss + discriminator_weight * discriminator_loss, int(batch["attention_mask"].sum())


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sequence classification cross-entropy: L = -1/B sum_b log softmax(z_b)[label_b], z_b the (labels,) logits.

    batch: input_ids, attention_mask (B, T), labels (B,).
    """
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, labels)
    return F.cross_entropy(logits.float(), batch["labels"]), int(batch["attention_mask"].sum())


def span_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Extractive QA: L = (CE(start logits, start) + CE(end logits, end)) / 2, each averaged over the batch.

    batch: input_ids, attention_mask, token_type_ids (B, T), starts and ends (B,) token positions;
    the model gives (B, T, 2) logits, [..., 0] for the start and [..., 1] for the end.
    """
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()  # (B, T, 2)
    loss = (F.cross_entropy(logits[..., 0], batch["starts"]) + F.cross_entropy(logits[..., 1], batch["ends"])) / 2
    return loss, int(batch["attention_mask"].sum())


def seq2seq_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Target-token cross-entropy of an encoder-decoder, optionally against smoothed labels.

    With e = label_smoothing and V the vocabulary: L = 1/N sum_t [(1 - e) (-log p_t[y_t]) + e/V sum_v (-log p_t[v])]
    over the N target positions with labels_t != -100 (e = 0: plain cross-entropy).
    batch: input_ids, attention_mask (B, S), decoder_input_ids, labels (B, T).
    """
    # NOTE: no decoder_attention_mask: right padding follows every real token, so the causal mask already hides
    # it from them, and without a padding mask attention keeps SDPA's causal fast path.
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])  # (B, T, vocab)
    labels = batch["labels"]
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log softmax(z_t)[y_t] at every position, 0 where y_t = -100: shape (rows, T)."""
    scored = batch["targets"] != IGNORE_INDEX  # (rows, T)
    # NOTE: the output layer runs on the scored (reply) tokens only: the prompt's logits would be thrown away, and
    # the vocabulary product is most of a small model's work.
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_at=scored)  # (scored, V)
    chosen = chosen_logprobs(logits, batch["targets"][scored])  # (scored,)
    return torch.zeros(scored.shape, dtype=chosen.dtype, device=chosen.device).masked_scatter(scored, chosen)


def chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (..., V), targets (...) -> log softmax(z_t)[y_t] (...), 0 where y_t = -100."""
    chosen = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return chosen * (targets != IGNORE_INDEX)


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(reply | prompt) per row: sum_{t: y_t != -100} log softmax(z_t)[y_t], shape (rows,)."""
    return token_logprobs(model, batch).sum(dim=-1)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_{t: y_t != -100} log softmax(z_t)[y_t] per row: logits (rows, T, V), targets (rows, T) -> (rows,)."""
    return chosen_logprobs(logits, targets).sum(dim=-1)


def dpo_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], reference: nn.Module, beta: float, sft_weight: float = 0.0
) -> tuple[torch.Tensor, int]:
    """DPO (https://arxiv.org/abs/2305.18290), with RPO's optional cross-entropy on the chosen reply.

    m = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), per pair (c chosen, r rejected, sums over reply tokens);
    L = -1/B sum_b log sigmoid(beta m_b) + sft_weight * 1/B sum_b (-log pi(c_b) / |c_b|).
    batch: rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected (see tasks/dpo.collate_pairs).
    """
    policy = sequence_logprobs(model, batch)  # (2B,)
    with torch.no_grad():
        anchor = sequence_logprobs(reference, batch)
    pairs = policy.shape[0] // 2
    margin = (policy[:pairs] - anchor[:pairs]) - (policy[pairs:] - anchor[pairs:])  # (B,)
    loss = -F.logsigmoid(beta * margin).mean()
    scored = batch["targets"] != IGNORE_INDEX
    if sft_weight:
        # NOTE: DPO alone can lower the likelihood of the chosen reply too, as long as the rejected one falls
        # faster; a cross-entropy term on the chosen reply keeps it up (RPO, https://arxiv.org/abs/2404.19733).
        loss = loss + sft_weight * (-policy[:pairs] / scored[:pairs].sum(dim=-1)).mean()
    return loss, int(scored.sum())


def grpo_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], clip: float = 0.2, kl_weight: float = 0.04
) -> tuple[torch.Tensor, int]:
    """GRPO's clipped objective with a KL penalty to a frozen reference (DeepSeekMath, https://arxiv.org/abs/2402.03300).

    Per sampled reply i with advantage A_i and tokens t, rho_t = pi(o_t) / pi_old(o_t) (pi_old: the policy that
    sampled it) and KL_t = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1 (an unbiased, positive estimate):
    L = -1/G sum_i 1/|o_i| sum_t [min(rho_t A_i, clip(rho_t, 1 - clip, 1 + clip) A_i) - kl_weight KL_t].
    batch: input_ids, attention_mask, targets (rows, T) with -100 off the replies, old_logprobs and ref_logprobs
    (rows, T) the reply tokens' log-probabilities under pi_old and pi_ref, advantages (rows,).
    """
    scored = (batch["targets"] != IGNORE_INDEX).float()  # (rows, T)
    policy = token_logprobs(model, batch)  # (rows, T)
    ratio = torch.exp(policy - batch["old_logprobs"])
    advantages = batch["advantages"][:, None]  # (rows, 1)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    to_reference = batch["ref_logprobs"] - policy
    kl = torch.exp(to_reference) - to_reference - 1
    per_token = (surrogate - kl_weight * kl) * scored
    loss = -(per_token.sum(dim=-1) / scored.sum(dim=-1).clamp(min=1)).mean()
    return loss, int(batch["attention_mask"].sum())


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: each reward standardised within its group, A_i = (r_i - mean(r)) / (std(r) + eps).

    rewards (groups * group_size,), each group's replies next to each other; a group whose rewards are all
    equal teaches nothing, and its advantages are exactly 0.
    """
    grouped = rewards.float().view(-1, group_size)  # (groups, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    advantages = centred / (grouped.std(dim=1, keepdim=True, unbiased=False) + eps)
    # NOTE: the mean of equal floats may be off by an ulp; equal rewards must give exactly 0, not +-1e-4.
    equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(advantages), advantages).flatten()


def distillation_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], teacher: nn.Module, temperature: float, alpha: float
) -> tuple[torch.Tensor, int]:
    """Knowledge distillation (https://arxiv.org/abs/1503.02531) mixed with next-token cross-entropy.

    With q = softmax(teacher logits / T) and p = softmax(student logits / T), per token:
    L = alpha T^2 1/N sum_t KL(q_t || p_t) + (1 - alpha) 1/N sum_t -log softmax(student logits_t)[y_t],
    N = B * T tokens; the T^2 keeps the soft term's gradient scale independent of T.
    """
    inputs, targets = batch
    logits = model(inputs).float()  # (B, T, V)
    with torch.no_grad():
        soft_targets = F.log_softmax(teacher(inputs).float() / temperature, dim=-1)
    student = F.log_softmax(logits / temperature, dim=-1)
    # KL(teacher || student) per token, averaged over tokens.
    kl = F.kl_div(student.flatten(0, 1), soft_targets.flatten(0, 1), log_target=True, reduction="batchmean")
    lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return alpha * temperature**2 * kl + (1 - alpha) * lm, targets.numel()
