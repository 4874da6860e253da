"""The mixture-of-experts block (titan_core.models.moe) and Qwen3-MoE's use of it.

References we did not write: transformers' ``Qwen3MoeSparseMoeBlock`` (routing and experts),
``load_balancing_loss_func`` (the auxiliary loss) and ``DeepseekV3TopkRouter`` (group-limited
sigmoid routing with a score-correction bias), all on CPU in fp32; the loop over experts for the
grouped matmul; transformers' ``Qwen3MoeConfig`` rule for which layers are sparse; the published
parameter counts of Qwen3-30B-A3B and Qwen3-235B-A22B.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from titan_core.models import FeedForward
from titan_core.models.moe import (
    GroupedExperts,
    MoE,
    MoEArgs,
    TokenChoiceRouter,
    grouped_mm_supported,
    load_balancing_loss,
    moe_layers,
    update_expert_bias,
)
from titan_qwen3 import QWEN3_FLAVORS, Qwen3Args, Qwen3Transformer

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_qwen3_moe  # noqa: E402


def close(actual, expected, rtol=1e-5):
    """Equal within ``rtol`` relative to the reference's largest entry (fp32 sums reorder)."""
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale.item())


# ---- grouped experts ---------------------------------------------------------------------------


def _experts_pair(dim, hidden, num_experts):
    grouped = GroupedExperts(dim, hidden, num_experts, use_grouped_mm=True)
    grouped.init_weights(0.05)
    looped = GroupedExperts(dim, hidden, num_experts, use_grouped_mm=False)
    looped.load_state_dict(grouped.state_dict())
    return grouped, looped


@pytest.mark.parametrize(
    "counts", [[3, 0, 7, 1, 4], [4, 4, 0, 0, 8]], ids=["15-rows-padded", "16-rows"]
)
@pytest.mark.parametrize("reduction", ["random-grad", "sum"])
def test_grouped_mm_equals_the_loop_forward_and_backward(counts, reduction):
    torch.manual_seed(0)
    grouped, looped = _experts_pair(dim=16, hidden=24, num_experts=5)
    x = torch.randn(sum(counts), 16)
    n = torch.tensor(counts)
    assert grouped_mm_supported(x, grouped.w1, grouped.w2, grouped.w3)  # CPU fp32: grouped_mm
    upstream = torch.randn(sum(counts), 16)
    results = []
    for experts in (grouped, looped):
        xi = x.clone().requires_grad_()
        out = experts(xi, n)
        # NOTE: .sum() hands back a stride-0 gradient, which _grouped_mm's backward refuses.
        (out.sum() if reduction == "sum" else (out * upstream).sum()).backward()
        results.append((out, xi.grad, experts.w1.grad, experts.w2.grad, experts.w3.grad))
    for got, want in zip(*results, strict=True):
        close(got, want, rtol=1e-6)
    w1_grad = results[0][2]
    assert w1_grad[counts.index(0)].abs().max() == 0  # an expert with no tokens: no gradient
    assert w1_grad[0].abs().max() > 0


def test_each_expert_is_a_swiglu_over_its_own_rows():
    torch.manual_seed(0)
    experts, _ = _experts_pair(dim=8, hidden=12, num_experts=3)
    x, counts = torch.randn(9, 8), [2, 3, 4]
    want = []
    for e, rows in enumerate(x.split(counts)):
        ffn = FeedForward(8, 12)
        with torch.no_grad():
            ffn.w1.weight.copy_(experts.w1[e])
            ffn.w2.weight.copy_(experts.w2[e])
            ffn.w3.weight.copy_(experts.w3[e])
        want.append(ffn(rows))
    close(experts(x, torch.tensor(counts)), torch.cat(want), rtol=1e-6)


def test_moe_layer_grouped_mm_equals_loop():
    torch.manual_seed(0)
    args = MoEArgs(num_experts=6, top_k=3, hidden_dim=12, num_shared_experts=1)
    grouped = MoE(16, args)
    grouped.init_weights(0.02)
    looped = MoE(16, dataclasses.replace(args, use_grouped_mm=False))
    looped.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 7, 16)
    outs = []
    for layer in (grouped, looped):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        outs.append((out, xi.grad, layer.experts.w2.grad, layer.router.gate.weight.grad))
    for got, want in zip(*outs, strict=True):
        close(got, want, rtol=1e-6)


# ---- against transformers' Qwen3-MoE block ---------------------------------------------------


def _hf_qwen3_moe_block(norm_topk_prob, num_experts, top_k, hidden=32, inner=24):
    config = transformers.Qwen3MoeConfig(
        hidden_size=hidden,
        moe_intermediate_size=inner,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        experts_implementation="eager",
    )
    block = hf_qwen3_moe.Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.3)
        block.experts.gate_up_proj.normal_(0, 0.2)
        block.experts.down_proj.normal_(0, 0.2)
    return block


def _titan_from_hf_block(block, norm_topk_prob, num_experts, top_k, hidden=32, inner=24):
    layer = MoE(
        hidden,
        MoEArgs(
            num_experts=num_experts, top_k=top_k, hidden_dim=inner, norm_topk_prob=norm_topk_prob
        ),
    )
    layer.init_weights(0.02)
    experts = block.experts
    # transformers 5 holds the routed experts fused: gate_up_proj (E, 2*inner, hidden) with the
    # gate rows first, down_proj (E, hidden, inner).
    assert experts.gate_up_proj.shape == (num_experts, 2 * inner, hidden)
    assert experts.down_proj.shape == (num_experts, hidden, inner)
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.gate.weight)
        layer.experts.w1.copy_(experts.gate_up_proj[:, :inner])
        layer.experts.w3.copy_(experts.gate_up_proj[:, inner:])
        layer.experts.w2.copy_(experts.down_proj)
    return layer


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (5, 3)])
def test_moe_layer_matches_transformers_qwen3_moe_block(norm_topk_prob, num_experts, top_k):
    torch.manual_seed(0)
    block = _hf_qwen3_moe_block(norm_topk_prob, num_experts, top_k)
    layer = _titan_from_hf_block(block, norm_topk_prob, num_experts, top_k)
    x = torch.randn(3, 10, 32)
    x_hf, x_titan = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = block(x_hf), layer(x_titan)
    close(got, want)
    upstream = torch.randn_like(want)
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    close(x_titan.grad, x_hf.grad)
    close(layer.router.gate.weight.grad, block.gate.weight.grad)
    close(layer.experts.w1.grad, block.experts.gate_up_proj.grad[:, :24])
    close(layer.experts.w2.grad, block.experts.down_proj.grad)
    # the routing is not trivial: every expert is used, no token sends all its weight to one
    assert (layer.tokens_per_expert > 0).all()


# ---- the auxiliary load-balancing loss -------------------------------------------------------


def test_load_balancing_loss_equals_transformers_over_several_layers():
    torch.manual_seed(0)
    base = MoEArgs(num_experts=8, top_k=2, hidden_dim=8, aux_loss_coef=1e-3)
    layers = [
        MoE(16, base),
        MoE(16, dataclasses.replace(base, load_balance_coeff=1e-3)),  # a biased selection
        MoE(16, dataclasses.replace(base, score_func="sigmoid")),
    ]
    for layer in layers:
        layer.init_weights(0.02)
        with torch.no_grad():
            layer.router.gate.weight.normal_(0, 0.5)
    with torch.no_grad():
        layers[1].expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    xs = [torch.randn(2, 9, 16) for _ in layers]
    for layer, x in zip(layers, xs, strict=True):
        layer(x)
    got = load_balancing_loss(layers)
    logits = tuple(layer.router.gate(x.view(-1, 16)) for layer, x in zip(layers, xs, strict=True))
    want = hf_qwen3_moe.load_balancing_loss_func(logits, num_experts=8, top_k=2)
    close(got, want, rtol=1e-6)
    assert abs(got.item() - 2.0) > 1e-3  # not the balanced value by construction
    # the gradient reaches the routers as transformers' does
    got_grads = torch.autograd.grad(got, [layer.router.gate.weight for layer in layers])
    want_grads = torch.autograd.grad(want, [layer.router.gate.weight for layer in layers])
    for g, w in zip(got_grads, want_grads, strict=True):
        close(g, w)


def test_load_balancing_loss_of_no_forward_is_zero():
    layer = MoE(8, MoEArgs(num_experts=4, top_k=1, hidden_dim=4))
    assert load_balancing_loss([layer]).item() == 0.0


# ---- group-limited sigmoid routing (DeepSeek V3) ---------------------------------------------


def test_group_limited_sigmoid_routing_matches_deepseek_v3():
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        hidden_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    hf_router = hf_deepseek.DeepseekV3TopkRouter(config)
    with torch.no_grad():
        hf_router.weight.normal_(0, 0.3)
        hf_router.e_score_correction_bias.uniform_(-0.2, 0.2)
    args = MoEArgs(
        num_experts=16,
        top_k=4,
        hidden_dim=8,
        score_func="sigmoid",
        norm_topk_prob=True,
        route_scale=2.5,
        n_group=4,
        topk_group=2,
        load_balance_coeff=1e-3,
    )
    router = TokenChoiceRouter(32, args)
    with torch.no_grad():
        router.gate.weight.copy_(hf_router.weight)
    bias = hf_router.e_score_correction_bias.clone()
    x = torch.randn(200, 32)
    _, want_w, want_idx = hf_router(x)
    got = router(x, bias)

    def by_expert(idx, w):
        order = idx.argsort(dim=-1)
        return idx.gather(1, order), w.gather(1, order)

    got_idx, got_w = by_expert(got.experts, got.weights)
    want_idx, want_w = by_expert(want_idx, want_w)
    assert torch.equal(got_idx, want_idx)
    close(got_w, want_w, rtol=1e-6)
    # both the bias and the group limit change some tokens' experts (so each is tested)
    no_bias, _ = by_expert(router(x).experts, router(x).weights)
    ungrouped = router.gate(x).sigmoid() + bias
    plain, _ = by_expert(ungrouped.topk(4, dim=-1).indices, ungrouped.topk(4, dim=-1).values)
    assert (no_bias != got_idx).any(dim=-1).sum() > 10
    assert (plain != got_idx).any(dim=-1).sum() > 10


# ---- expert-bias load balancing ---------------------------------------------------------------


def test_update_expert_bias_moves_by_the_sign_and_resets_the_counts():
    layer = MoE(8, MoEArgs(num_experts=4, top_k=1, hidden_dim=4, load_balance_coeff=0.1))
    plain = MoE(8, MoEArgs(num_experts=4, top_k=1, hidden_dim=4))
    for m in (layer, plain):
        m.init_weights(0.02)
    layer.tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 2.0, 2.0]))  # mean 4
    plain.tokens_per_expert.copy_(torch.tensor([3.0, 3.0, 3.0, 3.0]))
    stats = update_expert_bias([torch.nn.ModuleList([layer, plain])], group=None)
    # delta = 0.1 * sign(mean - count) = [-0.1, 0.1, 0.1, 0.1], centred: minus its mean 0.05
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert plain.expert_bias.abs().max() == 0  # no load_balance_coeff: no bias
    assert stats == {"moe_load_max_over_mean": pytest.approx(2.5)}
    assert layer.tokens_per_expert.abs().max() == 0 and plain.tokens_per_expert.abs().max() == 0


def _train_a_skewed_layer(load_balance_coeff, steps=20):
    """A lone MoE layer whose router favours experts 0 and 1, trained on a regression target;
    the max/mean load after each step."""
    torch.manual_seed(0)
    args = MoEArgs(num_experts=8, top_k=2, hidden_dim=16, load_balance_coeff=load_balance_coeff)
    layer = MoE(16, args)
    layer.init_weights(0.02)
    with torch.no_grad():
        layer.router.gate.weight[:2, 0] = 1.0  # inputs have +1 on feature 0: experts 0, 1 win
    target_map = torch.randn(16, 16) * 0.1
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    loads = []
    for _ in range(steps):
        x = torch.randn(16, 64, 16)
        x[..., 0] += 1.0
        loss = F.mse_loss(layer(x), x @ target_map)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loads.append(update_expert_bias([layer], group=None)["moe_load_max_over_mean"])
    return loads


def test_expert_bias_update_reduces_imbalance_over_20_steps():
    # NOTE: the step must stay below the spread of the scores, or the bias overshoots and the
    # load oscillates between experts (softmax over 8 experts: scores ~0.1 apart at most).
    balanced = _train_a_skewed_layer(load_balance_coeff=5e-3)
    unbalanced = _train_a_skewed_layer(load_balance_coeff=None)  # the control
    assert balanced[0] > 3 and unbalanced[0] == balanced[0]  # 2 experts take most tokens
    assert max(balanced[-3:]) < 0.6 * balanced[0]
    assert all(later <= earlier + 0.2 for earlier, later in itertools.pairwise(balanced))
    assert min(unbalanced) > 3  # training alone does not rebalance it in 20 steps


def _selective_op_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {torch.ops.aten.mm.default, torch.ops.aten._grouped_mm.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


@pytest.mark.parametrize("mode", ["full", "selective-op"])
@pytest.mark.parametrize(
    "changes",
    [{}, {"score_func": "sigmoid", "load_balance_coeff": 1e-3}, {"use_grouped_mm": False}],
    ids=["softmax", "sigmoid-biased", "loop"],
)
def test_activation_checkpointing_replay_counts_once_and_gives_the_same_gradients(mode, changes):
    torch.manual_seed(0)
    args = MoEArgs(num_experts=4, top_k=2, hidden_dim=8, aux_loss_coef=1e-2, **changes)
    layer = MoE(8, args)
    layer.init_weights(0.02)
    x = torch.randn(2, 5, 8)
    grads = []
    for checkpointed in (False, True):
        xi = x.clone().requires_grad_()
        if checkpointed:
            context = {"context_fn": _selective_op_context} if mode == "selective-op" else {}
            out = checkpoint(layer, xi, use_reentrant=False, **context)
        else:
            out = layer(xi)
        stats = layer.aux_stats
        (out.sum() + load_balancing_loss([layer])).backward()  # replays the forward
        assert layer.aux_stats is stats
        grads.append((xi.grad, layer.router.gate.weight.grad.clone()))
        layer.zero_grad()
    for got, want in zip(grads[1], grads[0], strict=True):
        close(got, want, rtol=1e-6)
    assert layer.tokens_per_expert.sum().item() == 2 * (2 * 5 * 2)  # two forwards, no replay
    layer.eval()
    layer(x)
    assert layer.tokens_per_expert.sum().item() == 2 * (2 * 5 * 2)  # evaluation counts nothing


def test_moe_args_refuse_impossible_routing():
    with pytest.raises(ValueError, match=r"top_k=9 .* 8 experts"):
        MoEArgs(num_experts=8, top_k=9, hidden_dim=4)
    with pytest.raises(ValueError, match="n_group=3 does not divide num_experts=8"):
        MoEArgs(num_experts=8, top_k=2, hidden_dim=4, n_group=3)
    with pytest.raises(ValueError, match=r"top_k=5 .* 4 experts"):
        MoEArgs(num_experts=8, top_k=5, hidden_dim=4, n_group=4, topk_group=2)


# ---- Qwen3-MoE ----------------------------------------------------------------------------------


def _tiny_qwen3_moe(**changes):
    base = dict(
        dim=32,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        hidden_dim=48,
        vocab_size=64,
        max_seq_len=16,
        moe=MoEArgs(
            num_experts=4, top_k=2, hidden_dim=16, load_balance_coeff=1e-3, aux_loss_coef=1e-2
        ),
        decoder_sparse_step=2,
        mlp_only_layers=(3,),
    )
    return Qwen3Args(**{**base, **changes})


def test_qwen3_sparse_layers_follow_transformers_rule_and_train_one_step():
    args = _tiny_qwen3_moe()
    config = transformers.Qwen3MoeConfig(
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        vocab_size=64,
    )
    hf_sparse = {
        i
        for i in range(6)
        if isinstance(
            hf_qwen3_moe.Qwen3MoeDecoderLayer(config, i).mlp, hf_qwen3_moe.Qwen3MoeSparseMoeBlock
        )
    }
    assert hf_sparse == {1, 5}
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    keys = set(model.state_dict())
    for i in range(6):
        moe_keys = {k for k in keys if k.startswith(f"layers.{i}.moe.")}
        dense_keys = {k for k in keys if k.startswith(f"layers.{i}.feed_forward.")}
        if i in hf_sparse:
            names = ["router.gate.weight", "expert_bias", "experts.w1", "experts.w2", "experts.w3"]
            assert moe_keys == {f"layers.{i}.moe.{name}" for name in names}
            assert not dense_keys
            assert model.layers[str(i)].moe.expert_bias.abs().max() == 0  # zeroed after to_empty
        else:
            assert dense_keys == {f"layers.{i}.feed_forward.w{j}.weight" for j in (1, 2, 3)}
            assert not moe_keys
    assert [len(moe_layers([model]))] == [2]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (2, 17))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    aux = load_balancing_loss(moe_layers([model]))
    (loss + args.moe.aux_loss_coef * aux).backward()
    opt.step()
    stats = update_expert_bias([model], group=None)
    assert torch.isfinite(loss) and torch.isfinite(aux) and stats["moe_load_max_over_mean"] >= 1
    after = model.state_dict()
    for key in keys:
        assert not torch.equal(before[key], after[key]), key  # every weight (and bias) moved


def test_qwen3_args_survive_a_json_round_trip():
    args = _tiny_qwen3_moe()
    as_json = dataclasses.asdict(args)
    as_json["mlp_only_layers"] = list(as_json["mlp_only_layers"])
    back = Qwen3Args(**{**as_json, "moe": MoEArgs(**as_json["moe"])})
    assert back == args and back.mlp_only_layers == (3,)


def _active_params(args: Qwen3Args) -> int:
    """Parameters one token uses, from the args: everything but the routed experts it skips."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    attention = args.dim * (2 * q + 2 * kv) + 2 * args.head_dim
    total = 2 * args.vocab_size * args.dim + args.dim  # untied tables, final norm
    for i in range(args.n_layers):
        total += attention + 2 * args.dim
        if args.is_moe_layer(i):
            moe = args.moe
            total += args.dim * moe.num_experts + 3 * args.dim * moe.hidden_dim * moe.top_k
        else:
            total += 3 * args.dim * args.hidden_dim
    return total


# Qwen3 technical report / model cards: total and activated parameters.
MOE_SIZES = {"30B-A3B": (30.5e9, 3.3e9), "235B-A22B": (235e9, 22e9)}


@pytest.mark.parametrize("flavor", list(MOE_SIZES))
def test_moe_flavor_parameter_counts_match_the_released_models(flavor):
    total, active = MOE_SIZES[flavor]
    args = dataclasses.replace(QWEN3_FLAVORS[flavor], max_seq_len=16)
    with torch.device("meta"):
        model = Qwen3Transformer(args)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(total, rel=0.01)
    assert _active_params(args) == pytest.approx(active, rel=0.02)
    experts = sum(m.experts.w1.numel() * 3 for m in moe_layers([model]))
    skipped = experts * (1 - args.moe.top_k / args.moe.num_experts)
    assert count - skipped == pytest.approx(_active_params(args), abs=1)
    assert len(moe_layers([model])) == args.n_layers  # every layer sparse
    assert (args.head_dim, args.vocab_size, args.rope_theta) == (128, 151936, 1e6)


def test_debugmodel_moe_is_small_untied_and_mixes_dense_and_moe_layers():
    args = QWEN3_FLAVORS["debugmodel_moe"]
    assert args.vocab_size == 2048 and not args.tie_word_embeddings
    assert args.moe.num_experts == 8 and args.moe.top_k == 2
    kinds = [args.is_moe_layer(i) for i in range(args.n_layers)]
    assert not kinds[0] and all(kinds[1:])
    with torch.device("meta"):
        model = Qwen3Transformer(args)
    assert sum(p.numel() for p in model.parameters()) < 15e6
