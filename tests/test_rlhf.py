"""RLHF: reward model, PPO and GRPO (lmforge.finetune.rlhf, lmforge.recipes.rlhf).

What is compared with what:
* the reward model's rewards and Bradley-Terry loss equal TRL's RewardTrainer.compute_loss on a transformers
  GPT2ForSequenceClassification holding the same weights (margin and centring options too);
* GRPO: on rollouts, rewards and reference log-probs produced by TRL's own GRPOTrainer._generate_and_score_completions,
  our group advantages equal TRL's and our loss equals GRPOTrainer._compute_loss for loss types grpo, bnpo and dr_grpo;
* PPO: TRL 1.16 no longer ships a PPO trainer (it was trl/experimental/ppo/ppo_trainer.py, removed later), so our
  rewards, GAE, whitening, clipped policy and value losses are compared with that file's step transcribed below
  (huggingface/trl commit 0062ee10a9bc59dbb7ba244f3bbaf2e81f25196f), using TRL 1.16's first_true_indices for its masks;
* rollouts: the log-probs the generation loop records while sampling equal `policy_logprobs` on the padded batch;
* the recipes and the CLI end to end on a tiny model.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lmforge
from lmforge.finetune import rlhf
from lmforge.generation.sampling import SamplingParams

warnings.filterwarnings("ignore")


def _hf_tokenizer(transformers, tokenizers):
    vocab = {f"w{i}": i for i in range(60)} | {"[UNK]": 60, "[EOS]": 61, "[PAD]": 62}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]", pad_token="[PAD]",
                                                unk_token="[UNK]")


def _tiny_gpt2(transformers, seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=64, bos_token_id=61, eos_token_id=61,
        pad_token_id=62))


# ================================================================================================================
# Reward model
# ================================================================================================================
def test_bradley_terry_by_hand():
    import math

    rc, rr = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    expected = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(1.0))) / 2
    assert rlhf.bradley_terry_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)
    assert rlhf.bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(
        expected + 0.1 * (2.5 ** 2 + 1.0) / 2, rel=1e-6)
    assert rlhf.pairwise_accuracy(rc, rr) == 0.5
    assert rlhf.pairwise_accuracy(torch.zeros(4), torch.zeros(4)) == 0.5  # ties count half: chance


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl_reward_trainer(tmp_path, center):
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    trl = pytest.importorskip("trl")

    tok = _hf_tokenizer(transformers, tokenizers)
    lm_model = _tiny_gpt2(transformers)
    lm_model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    seq = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**{
        **lm_model.config.to_dict(), "num_labels": 1}))
    seq.transformer.load_state_dict(lm_model.transformer.state_dict())
    torch.manual_seed(1)
    torch.nn.init.normal_(seq.score.weight, std=0.5)
    rows = [{"prompt": "w1 w2 w3", "chosen": " w4 w5 w9", "rejected": " w6"},
            {"prompt": "w7 w8", "chosen": " w10", "rejected": " w11 w12 w13 w14"},
            {"prompt": "w20 w21 w22 w23", "chosen": " w24 w25", "rejected": " w26 w27"}]
    cfg = trl.RewardConfig(output_dir=str(tmp_path / "run"), report_to=[], per_device_train_batch_size=3,
                           max_steps=1, use_cpu=True, seed=0, bf16=False, center_rewards_coefficient=center)
    trainer = trl.RewardTrainer(model=seq, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    m = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    lm = lmforge.load(tmp_path / "base")
    rm = rlhf.RewardModel(lm.model).eval()
    with torch.no_grad():
        rm.head.weight.copy_(seq.score.weight)
        rewards = rm(batch["input_ids"], batch["attention_mask"])
        trl_rewards = seq(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(rewards, trl_rewards, atol=1e-5, rtol=1e-5)
    rc, rr = rewards.chunk(2)
    assert rlhf.bradley_terry_loss(rc, rr, center_coef=center).item() == pytest.approx(trl_loss, abs=1e-5)
    assert rlhf.pairwise_accuracy(rc, rr) == pytest.approx(m["accuracy"])
    assert (rc - rr).mean().item() == pytest.approx(m["margin"], abs=1e-5)
    margin = torch.tensor([0.5, 0.0, 1.0])  # Llama 2's margin option
    with torch.no_grad():
        trl_margin = trainer.compute_loss(trainer.model, {**batch, "margin": margin}).item()
    assert rlhf.bradley_terry_loss(rc, rr, margin, center).item() == pytest.approx(trl_margin, abs=1e-5)


# ================================================================================================================
# GRPO against TRL's GRPOTrainer
# ================================================================================================================
@pytest.fixture(scope="module")
def trl_grpo(tmp_path_factory):
    """TRL's GRPOTrainer on a tiny GPT-2, and one batch its own generate-and-score step produced."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    trl = pytest.importorskip("trl")

    d = tmp_path_factory.mktemp("grpo")
    tok = _hf_tokenizer(transformers, tokenizers)
    _tiny_gpt2(transformers).save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")
    G = 4
    cfg = trl.GRPOConfig(output_dir=str(d / "run"), report_to=[], per_device_train_batch_size=8, num_generations=G,
                         max_completion_length=6, beta=0.1, loss_type="grpo", use_cpu=True, bf16=False,
                         temperature=1.0, seed=0)
    prompts = ["w1 w2 w3", "w4 w5 w6"]  # equal lengths: no left padding (TRL's forward uses plain positions)
    ds = datasets.Dataset.from_list([{"prompt": p} for p in prompts] * 4)
    seen: dict[str, list] = {}

    def reward(prompts, completions, **kw):  # varied within each group
        seen["r"] = [float((len(c) * 7 + i) % 5) for i, c in enumerate(completions)]
        return seen["r"]

    reward.__name__ = "toy"
    trainer = trl.GRPOTrainer(model=str(d / "policy"), reward_funcs=reward, args=cfg, train_dataset=ds,
                              processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(G)])
    return trainer, out, torch.tensor(seen["r"]), G, d / "policy"


def test_group_advantages_equal_trl(trl_grpo):
    _, out, rewards, G, _ = trl_grpo
    assert rewards.view(-1, G).std(1).min() > 0  # each group has something to learn from
    torch.testing.assert_close(rlhf.group_advantages(rewards, G), out["advantages"], atol=1e-6, rtol=1e-6)
    assert rlhf.group_advantages(torch.ones(8), 4).abs().max() == 0  # a group that all scores alike: no signal


@pytest.mark.parametrize("loss_type,correction", [("grpo", True), ("bnpo", True), ("dr_grpo", True),
                                                  ("grpo", False)])
def test_grpo_loss_equals_trl(trl_grpo, loss_type, correction):
    trainer, out, rewards, G, policy_dir = trl_grpo
    inputs = dict(out)
    mask = inputs["completion_mask"]
    g = torch.Generator().manual_seed(3)
    # old and reference log-probs away from the policy's, so the ratio clips somewhere and the KL is not 0
    with torch.no_grad():
        hf_lp = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])[0]
    inputs["old_per_token_logps"] = hf_lp + 0.3 * torch.randn(hf_lp.shape, generator=g)
    inputs["ref_per_token_logps"] = hf_lp + 0.5 * torch.randn(hf_lp.shape, generator=g)
    trainer.loss_type = loss_type
    trainer.args.use_bias_correction_kl = correction
    trainer.model.eval()
    trl_loss = trainer._compute_loss(trainer.model, inputs).item()

    policy = lmforge.load(policy_dir).model.eval()
    ro = rlhf.Rollout(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask,
                      [""] * len(mask), [""] * len(mask))
    lp = rlhf.policy_logprobs(policy, ro)
    torch.testing.assert_close(lp * mask, hf_lp * mask, atol=1e-5, rtol=1e-5)
    loss, stats = rlhf.grpo_loss(lp, inputs["old_per_token_logps"], inputs["ref_per_token_logps"],
                                 rlhf.group_advantages(rewards, G), mask, beta=0.1, epsilon=0.2,
                                 loss_type=loss_type, max_completion_length=6, kl_ratio_correction=correction)
    assert 0 < stats["clip_ratio"] < 1
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    mode = trainer._metrics["eval"]
    assert stats["kl_k3"] == pytest.approx(mode["kl"][-1], abs=1e-5)


# ================================================================================================================
# PPO against the last TRL PPO trainer's step
# ================================================================================================================
INVALID_LOGPROB = 1.0


def _trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_masked_whiten(values, mask, shift_mean=True):
    mean = _trl_masked_mean(values, mask)
    var = _trl_masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def _trl_ppo_step(responses, logprobs, ref_logprobs, values, scores, new_logprobs, vpred, pad_id, args):
    """PPOTrainer.train's rollout post-processing and one minibatch loss, from trl/experimental/ppo/ppo_trainer.py
    (huggingface/trl 0062ee10), variable names kept. `responses` are already truncated after the stop token."""
    from trl.experimental.utils import first_true_indices

    sequence_lengths = first_true_indices(responses == pad_id) - 1
    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if args["kl_estimator"] == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -args["kl_coef"] * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args["gamma"] * nextvalues - values[:, t]
        lastgaelam = delta + args["gamma"] * args["lam"] * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    # one minibatch (the whole batch)
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - args["cliprange_value"], values + args["cliprange_value"])
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * _trl_masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - args["cliprange"], 1.0 + args["cliprange"])
    pg_loss = _trl_masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    pg_clipfrac = _trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return dict(rewards=rewards, advantages=advantages, returns=returns, pg_loss=pg_loss, vf_loss=vf_loss,
                pg_clipfrac=pg_clipfrac, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_equals_trl_ppo_step(estimator):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    B, T, pad = 5, 7, 0
    responses = torch.randint(3, 20, (B, T), generator=g)
    for b, n in enumerate([3, 7, 1, 5, 6]):  # real tokens per row (the stop token is the pad id here, as in TRL)
        responses[b, n:] = pad
    logprobs = -torch.rand(B, T, generator=g) * 3
    ref_logprobs = logprobs + 0.3 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    scores = torch.randn(B, generator=g)
    new_logprobs = logprobs + 0.4 * torch.randn(B, T, generator=g)
    vpred = values + 0.5 * torch.randn(B, T, generator=g)
    args = dict(kl_estimator=estimator, kl_coef=0.2, gamma=0.99, lam=0.9, cliprange=0.2, cliprange_value=0.2)
    ref = _trl_ppo_step(responses, logprobs, ref_logprobs, values, scores, new_logprobs, vpred, pad, args)

    # TRL keeps two masks: the policy's tokens, and one token more (its stop token) for values and rewards; its
    # log-probs outside the first are a constant, so their KL is 0. Our functions take the masks they are given.
    pmask, vmask = (~ref["padding_mask"]).long(), (~ref["padding_mask_p1"]).long()
    rewards, _ = rlhf.kl_penalized_rewards(scores, logprobs * pmask, ref_logprobs * pmask, vmask, 0.2, estimator)
    torch.testing.assert_close(rewards, ref["rewards"], atol=1e-6, rtol=1e-6)
    adv, returns = rlhf.gae(rewards, values, vmask, gamma=0.99, lam=0.9)
    torch.testing.assert_close(returns, ref["returns"], atol=1e-5, rtol=1e-5)
    adv = rlhf.masked_whiten(adv, pmask) * pmask
    torch.testing.assert_close(adv, ref["advantages"], atol=1e-5, rtol=1e-5)
    pg, pg_stats = rlhf.ppo_policy_loss(new_logprobs, logprobs, adv, pmask, 0.2)
    vf, _ = rlhf.ppo_value_loss(vpred, values * vmask, returns, vmask, 0.2)
    assert pg.item() == pytest.approx(ref["pg_loss"].item(), abs=1e-5)
    assert vf.item() == pytest.approx(ref["vf_loss"].item(), abs=1e-5)
    assert pg_stats["clipfrac"] == pytest.approx(ref["pg_clipfrac"].item(), abs=1e-6)


# ================================================================================================================
# Rollouts, references, updates
# ================================================================================================================
def _tiny_lm(vocab_text="0123456789+= abcdefgh", block_size=48, seed=0):
    from lmforge.lm import LM
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    from lmforge.tokenizers.bpe import Tokenizer

    tok = Tokenizer.train([vocab_text], vocab_size=257, progress=False)  # bytes + <|endoftext|>
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2,
                                n_kv_head=1, intermediate_size=64, block_size=block_size)
    model = Transformer(cfg)
    with torch.no_grad():  # make EOS likely enough that some rollouts stop early
        model.lm_head.weight[tok.eos_token_id] += 0.5 * model.norm_f.weight.sign()
    return LM(model, tok, cfg)


def test_rollouts_logprobs_match_generation():
    lm = _tiny_lm()
    prompts = ["1+2=", "33+44=", "a"]  # different lengths: left padding
    params = SamplingParams(max_new_tokens=6, temperature=1.0, logprobs=True)
    ro = rlhf.sample_completions(lm.model, lm.tokenizer, prompts, params, 3, seed=5, pad_id=0)
    assert ro.prompt_ids.shape[0] == 9 and ro.group == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(r) for r in ro.completion_ids[:3].tolist()}) > 1  # samples of one prompt differ
    eos = lm.tokenizer.eos_token_id
    stopped = [b for b in range(9) if eos in ro.completion_ids[b][ro.completion_mask[b].bool()].tolist()]
    assert stopped and len(stopped) < 9  # some rows ended with EOS (kept, masked in), some ran to the limit
    for b in stopped:
        n = int(ro.completion_mask[b].sum())
        assert ro.completion_ids[b, n - 1] == eos
    lp = rlhf.policy_logprobs(lm.model, ro)
    again = rlhf.sample_completions(lm.model, lm.tokenizer, prompts, params, 3, seed=5, pad_id=0)
    assert torch.equal(again.completion_ids, ro.completion_ids)  # seeded: reproducible
    # the generation loop's own log-probs of the sampled tokens (recorded while sampling, EOS not recorded)
    from lmforge.generation.loop import decode_steps
    from lmforge.generation.stops import StopChecker

    rows = [lm.tokenizer.encode(p) for p in prompts for _ in range(3)]
    checkers = [StopChecker(lm.tokenizer, [], [eos], context_ids=r) for r in rows]
    for c in checkers:
        c.logprobs, c.top_logprobs = [], None
    gens = [torch.Generator().manual_seed(5 * 1_000_003 + r) for r in range(9)]
    for _ in decode_steps(lm.model, rows, params, checkers, pad_id=0, generators=gens, max_len=48):
        pass
    for b, c in enumerate(checkers):
        torch.testing.assert_close(lp[b, :len(c.logprobs)], torch.tensor(c.logprobs), atol=1e-5, rtol=1e-5)


def test_lora_reference_is_the_base_model():
    from lmforge.finetune import lora

    lm = _tiny_lm()
    ro = rlhf.sample_completions(lm.model, lm.tokenizer, ["1+2="], SamplingParams(max_new_tokens=4), 2, pad_id=0)
    base = rlhf.policy_logprobs(lm.model, ro).detach()
    lora.add_lora(lm.model, ["q_proj", "v_proj"], r=4, alpha=8)
    for _, layer in lora.lora_layers(lm.model):  # move the adapters away from zero
        for p in layer.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.3)
    assert not torch.allclose(rlhf.policy_logprobs(lm.model, ro), base, atol=1e-4)
    torch.testing.assert_close(rlhf.reference_logprobs(lm.model, None, ro), base)


def test_updates_move_logprobs_along_the_advantages():
    """One small SGD step on each loss: sum_i A_i * (change of log π(y_i)) > 0 (first order: lr * |grad|^2)."""
    lm = _tiny_lm()
    ro = rlhf.sample_completions(lm.model, lm.tokenizer, ["1+2=", "4+4="], SamplingParams(max_new_tokens=5), 4,
                                 seed=1, pad_id=0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])

    def seq_lp():
        with torch.no_grad():
            return (rlhf.policy_logprobs(lm.model, ro) * ro.completion_mask).sum(1)

    before = seq_lp()
    b = rlhf.grpo_batch(lm.model, None, ro, rewards, 4, beta=0.0)
    rlhf.grpo_update(lm.model, torch.optim.SGD(lm.model.parameters(), lr=1e-3), b, beta=0.0, grad_clip=0)
    assert (b.advantages * (seq_lp() - before)).sum() > 0

    model = rlhf.PolicyWithValue(lm.model)
    before = seq_lp()
    pb = rlhf.ppo_batch(model, copy_of(lm.model), ro, rewards, kl_coef=0.0)
    per_seq_adv = (pb.advantages * ro.completion_mask).sum(1)
    rlhf.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1e-3), pb, epochs=1, vf_coef=0.0, grad_clip=0)
    assert (per_seq_adv * (seq_lp() - before)).sum() > 0


def test_rollouts_after_an_update_use_the_updated_weights():
    """The fused AdamW the recipes use does not bump the weights' version counters, which the fast decode step's
    weight copies are keyed on; the updates mark the weights changed, so the next rollout samples the new policy."""
    from lmforge.training.loop import TrainConfig, configure_optimizer

    lm = _tiny_lm()
    params = SamplingParams(max_new_tokens=6, temperature=1.0, logprobs=True)
    ro = rlhf.sample_completions(lm.model, lm.tokenizer, ["1+2=", "4+4="], params, 4, seed=1, pad_id=0)
    opt = configure_optimizer(lm.model, TrainConfig(lr=5e-2, weight_decay=0.0))
    assert opt.param_groups[0].get("fused")
    b = rlhf.grpo_batch(lm.model, None, ro, torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0]), 4, beta=0.0)
    rlhf.grpo_update(lm.model, opt, b, beta=0.0)
    from lmforge.generation.loop import generate_ids

    prompt = lm.tokenizer.encode("1+2=")
    c = generate_ids(lm.model, [prompt], SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=True),
                     lm.tokenizer)[0]
    n = len(c.token_ids)
    assert n >= 2
    again = rlhf.Rollout(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                         torch.tensor([c.token_ids]), torch.ones(1, n, dtype=torch.long), [""], [""])
    torch.testing.assert_close(rlhf.policy_logprobs(lm.model, again)[0], torch.tensor(c.logprobs), atol=1e-5,
                               rtol=1e-5)


def copy_of(model):
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def test_builtin_rewards():
    assert rlhf.arithmetic_reward(["12+7=", "3*4=", "10-3=", "Q: 5+5="], ["19", " 11", "7\n", "10"]) == [
        1.0, 0.0, 1.0, 1.0]
    with pytest.raises(lmforge.errors.DataError):
        rlhf.arithmetic_reward(["hello"], ["1"])
    assert rlhf.length_reward(4)(["p", "p"], ["a b c d", "a b"]) == [1.0, 0.5]
    prompts = rlhf.arithmetic_prompts(50, 9, "+-", seed=3)
    assert prompts == rlhf.arithmetic_prompts(50, 9, "+-", seed=3) and all(p.endswith("=") for p in prompts)


# ================================================================================================================
# Recipes and the command line
# ================================================================================================================
@pytest.fixture(scope="module")
def rl_files(tmp_path_factory):
    import random

    d = tmp_path_factory.mktemp("rl")
    lm = _tiny_lm("0123456789+= abcdefgh\n#:.,ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz", block_size=152)
    lm.save(d / "base")
    rng = random.Random(0)
    recs = [{"instruction": f"say {w}", "input": "", "output": w, "chosen": w, "rejected": f"{w} no"}
            for w in (rng.choice(["ab", "cd", "ef"]) + str(i) for i in range(30))]
    (d / "prefs.json").write_text(json.dumps(recs))
    return d


def test_reward_recipe_and_cli(rl_files, tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "rm"
    rc = main(["finetune", "reward", str(rl_files / "base"), "--data", str(rl_files / "prefs.json"), "--out", str(out),
               "--max-steps", "6", "--batch-size", "4", "--lr", "1e-3", "--progress", "false", "--device", "cpu",
               "--eval-every", "3"])
    assert rc == 0
    log = capsys.readouterr().out
    assert "held-out (test) pairwise accuracy before" in log and "after" in log
    m = json.loads((out / "metrics.json").read_text())
    from lmforge.finetune import data as D
    from lmforge.recipes.sft import load_splits
    from lmforge.recipes.rlhf import RewardConfig, pairwise_eval

    parts = load_splits(RewardConfig(model="x", data=str(rl_files / "prefs.json"), out="y"))
    assert m["held_out_split"] == "test" and m["after"]["pairs"] == len(parts["test"]) > 0  # never trained on
    train_prompts = {r["instruction"] for r in parts["train"]}
    assert not any(r["instruction"] in train_prompts for r in parts["test"])
    rm_lm, rm, cfg = rlhf.load_reward_model(out)
    assert cfg["pooling"] == "last_token"
    # the saved head and base give the rewards the recipe measured on the held-out pairs
    L = rm_lm.config.block_size
    rows = [[rlhf.reward_input(rm_lm.tokenizer, D.alpaca_prompt(r), r[k], L) for r in parts["test"]]
            for k in ("chosen", "rejected")]
    assert max(len(x) for x in rows[0] + rows[1]) == L  # long inputs keep their end (the response), cut at L
    b = D.classification_collate([(x, 0) for x in rows[0] + rows[1]], rm_lm.tokenizer.eos_token_id)
    again = pairwise_eval(rm, [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}])
    assert again["pairwise_accuracy"] == m["after"]["pairwise_accuracy"]
    assert m["after"]["margin"] != 0
    assert again["margin"] == pytest.approx(m["after"]["margin"], abs=1e-5)
    assert lmforge.load(out).model is not None  # still an ordinary model directory


def test_ppo_with_a_reward_model_and_grpo_with_arithmetic(rl_files, tmp_path, capsys):
    from lmforge.cli import main

    rm_dir = tmp_path / "rm"
    assert main(["finetune", "reward", str(rl_files / "base"), "--data", str(rl_files / "prefs.json"), "--out",
                 str(rm_dir), "--max-steps", "2", "--batch-size", "4", "--progress", "false", "--device", "cpu"]) == 0
    out = tmp_path / "ppo"
    assert main(["finetune", "ppo", str(rl_files / "base"), "--reward", str(rm_dir), "--data",
                 str(rl_files / "prefs.json"), "--out", str(out), "--max-steps", "2", "--prompts-per-step", "2",
                 "--max-new-tokens", "4", "--eval-prompts", "2", "--ppo-epochs", "2", "--device", "cpu",
                 "--lora-r", "4"]) == 0
    recs = [json.loads(x) for x in (out / "rl_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "reward" in r] == [1, 2]
    assert all(k in recs[1] for k in ("reward", "kl", "policy_loss", "value_loss", "clipfrac"))
    assert (out / "adapter_model.safetensors").is_file() and (out / rlhf.VALUE_HEAD).is_file()
    assert (out / "rlhf.png").is_file() and "eval_reward_after" in json.loads((out / "metrics.json").read_text())

    out = tmp_path / "grpo"
    assert main(["finetune", "grpo", str(rl_files / "base"), "--reward", "arithmetic", "--out", str(out),
                 "--max-steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "3", "--max-new-tokens", "3",
                 "--eval-prompts", "4", "--num-prompts", "20", "--device", "cpu"]) == 0
    recs = [json.loads(x) for x in (out / "rl_metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 1 and "clip_ratio" in recs[0] and "kl" in recs[0]
    assert lmforge.load(out).model is not None  # a whole model directory (no LoRA)


@pytest.mark.parametrize("argv,message", [
    (["grpo", "--reward", "nonsense"], "--reward must be arithmetic, length or a reward model directory"),
    (["grpo", "--reward", "length"], "needs prompts: pass --data"),
    (["grpo", "--reward", "arithmetic", "--samples-per-prompt", "1"], "samples_per_prompt must be >= 2"),
    (["ppo", "--reward", "arithmetic", "--kl-estimator", "k2"], "kl_estimator must be k1 or k3"),
    (["ppo"], "no reward given"),
    (["ppo", "--reward", "arithmetic", "--epochs", "2"], "use --max-steps, not --epochs"),
])
def test_cli_errors_are_one_line(rl_files, tmp_path, capsys, argv, message):
    from lmforge.cli import main

    rc = main(["finetune", argv[0], str(rl_files / "base"), "--out", str(tmp_path / "o"), *argv[1:]])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_reward_dir_error(rl_files, tmp_path, capsys):
    from lmforge.cli import main

    rc = main(["finetune", "ppo", str(rl_files / "base"), "--reward", str(rl_files / "base"), "--data",
               str(rl_files / "prefs.json"), "--out", str(tmp_path / "o")])
    assert rc != 0 and "not a reward model directory" in capsys.readouterr().err


@pytest.mark.parametrize("recipe,name", [("reward", "reward"), ("grpo", "grpo-arithmetic"), ("ppo", "ppo-arithmetic")])
def test_shipped_configs_load(recipe, name):
    from pathlib import Path

    from lmforge import argconf
    from lmforge.cli.finetune import _recipe

    cls, _ = _recipe(recipe)
    cfg = argconf.build(cls, argconf.load_yaml(Path(__file__).resolve().parent.parent / "configs" / "finetune" /
                                               f"{name}.yaml"))
    assert cfg.batch_size >= 1 and (recipe == "reward" or cfg.reward == "arithmetic")


def test_prompt_longer_than_the_context_is_a_clear_error():
    lm = _tiny_lm(block_size=16)
    with pytest.raises(lmforge.errors.DataError, match="no room in the model's 16-token context"):
        rlhf.sample_completions(lm.model, lm.tokenizer, ["1+2=", "1" * 20 + "+2="], SamplingParams(), pad_id=0)
