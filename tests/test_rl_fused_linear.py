"""pyalign.rl.fused_linear_policy_loss: both schedules (the single pass that forms the head's gradient
in the forward for token-local configurations, and the composite of the fused head and the policy
kernel) against the eager composition (full logits, log_softmax, the policy loss) and against each
other; the token-local property itself; which schedule each call takes; opcheck, torch.compile,
memory and bad input."""
from __future__ import annotations

import pytest
import torch

import pyalign
from pyalign import rl
from pyalign.bench.memory import measure
from pyalign.ops.linear import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT
from pyalign.rl.fused_linear import _POLICY_LOSS
from pyalign.rl.policy import prepare

from test_rl import LOSS_TYPES, OPTIONS, batch, close

SINGLE, COMPOSITE = "linear_policy_loss_fwd_grad", "policy_loss"
LOCAL_OPTIONS = [o for o in OPTIONS
                 if o.get("importance_sampling_level") != "sequence" and "top_entropy_quantile" not in o
                 and "off_policy_mask_threshold" not in o]


def head(B=3, T=6, H=8, V=23, dtype=torch.float64, device="cpu", seed=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(device, dtype)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(device, dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(device, dtype)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    mask[2, 4:] = 0
    old = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).to(device)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(device)
    return hidden, weight, bias, labels, mask, old, adv


def options(opts, old, device):
    """Per-option-set inputs the options need (reference and sampler log-probs)."""
    kw = dict(opts)
    kw.setdefault("ref_logps", old + 0.1)
    kw.setdefault("sampling_logps", old - 0.05)
    if kw.get("num_items_in_batch"):
        kw["num_items_in_batch"] = 5
    return kw


def fused(hidden, weight, bias, labels, mask, old, adv, *, forward_gradients=True, temperature=0.7, **kw):
    """Loss, metrics (floats), gradients of hidden/weight/bias and the name of the op that made the
    loss (which schedule ran)."""
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with pyalign.overrides(forward_gradients=forward_gradients):
        loss, metrics = rl.fused_linear_policy_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2],
                                                    temperature=temperature, **kw)
        grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), metrics.to_floats(), grads, type(loss.grad_fn).__name__.removesuffix("Backward")


def eager(hidden, weight, bias, labels, mask, old, adv, **kw):
    kw.pop("chunk_size", None)
    leaves = [t.clone().double().requires_grad_() for t in (hidden, weight, bias)]
    z = torch.log_softmax((leaves[0] @ leaves[1].t() + leaves[2]) / 0.7, -1)
    lp = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(z.exp() * z).sum(-1)
    loss, metrics = rl.policy_loss(lp, old, adv, mask, entropy=ent, **kw)
    return loss.detach(), metrics.to_floats(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_local_is_what_the_gradients_show(loss_type):
    """``token_local`` (which selects the single pass) holds exactly where one token's gradients do not
    move when every other token's log-prob and entropy change: perturbing them leaves token 0's
    gradients bitwise the same for the token-local option sets, and changes them for the others."""
    b = batch(B=3, T=6)
    for opts in OPTIONS:
        kw = dict(opts, loss_type=loss_type, ref_logps=b["ref_logps"], sampling_logps=b["sampling_logps"])
        if loss_type == "cispo":  # CISPO's weight min(r, epsilon_high) must not be the constant bound
            kw["epsilon_high"] = 3.0
        bound = _POLICY_LOSS.bind(b["logps"], b["old_logps"], b["advantages"], b["mask"], entropy=b["entropy"], **kw)
        bound.apply_defaults()
        local = prepare(bound.arguments)[1].token_local

        def grads_at_first_token(lp, ent):
            lp, ent = lp.clone().requires_grad_(), ent.clone().requires_grad_()
            loss, _ = rl.policy_loss(lp, b["old_logps"], b["advantages"], b["mask"], entropy=ent, **kw)
            g_lp, g_ent = torch.autograd.grad(loss, (lp, ent))
            return g_lp[0, 0], g_ent[0, 0]
        base = grads_at_first_token(b["logps"], b["entropy"])
        others = torch.ones_like(b["logps"], dtype=torch.bool)
        others[0, 0] = False  # the rest of the first sequence and the other sequences
        same = True
        for shift, factor in ((-0.5, 1.5), (0.5, 0.7)):  # both ways: a mask may already be on or off
            lp = torch.where(others, b["logps"] + shift, b["logps"])
            ent = torch.where(others, b["entropy"] * factor, b["entropy"])
            same &= all(torch.equal(x, y) for x, y in zip(base, grads_at_first_token(lp, ent)))
        expect_local = (opts.get("importance_sampling_level") != "sequence" and "top_entropy_quantile" not in opts
                        and "off_policy_mask_threshold" not in opts and loss_type != "vespo")
        assert local == expect_local, (loss_type, opts)
        assert same == local, (loss_type, opts)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_both_schedules_match_the_eager_composition(device, loss_type):
    """fp64, several token chunks (chunk_size 4 over 16 kept tokens), a bias: the loss, every metric and
    the gradients of hidden, weight and bias equal the eager composition's for every option set; the
    single pass runs exactly for the token-local ones; the two schedules agree bitwise on the loss and
    metrics."""
    t = head(device=device)
    for opts in OPTIONS:
        kw = options(dict(opts, loss_type=loss_type), t[5], device)
        want_loss, want_metrics, want = eager(*t, **kw)
        one = fused(*t, chunk_size=4, **kw)
        two = fused(*t, chunk_size=4, forward_gradients=False, **kw)
        local = opts in LOCAL_OPTIONS and loss_type != "vespo"
        assert one[3] == (SINGLE if local else COMPOSITE), (loss_type, opts, one[3])
        assert two[3] == COMPOSITE
        assert torch.equal(one[0], two[0]) and one[1] == two[1], (loss_type, opts)
        close(one[0], want_loss, 1e-10)
        assert one[1].keys() == want_metrics.keys() - ({"entropy"} if not kw.get("entropy_coef") else set())
        for k in one[1]:
            close(one[1][k], want_metrics[k], 1e-9)
        for got in (one[2], two[2]):
            for a, b in zip(got, want):
                close(a, b, 1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("chunk", [None, 5])
def test_low_precision_single_pass_matches_composite(device, dtype, tol, chunk):
    """fp32 and bf16 heads, one chunk (bf16 dW straight into the result) or several (bf16 dW in the
    fp32 accumulator): the single pass's gradients equal the composite's within the dtype's rounding."""
    t = head(B=4, T=9, H=16, V=40, dtype=dtype, device=device)
    kw = dict(loss_type="dapo", beta=0.04, ref_logps=t[5] + 0.1, epsilon_high=0.28, entropy_coef=0.01,
              chunk_size=chunk)
    one, two = fused(*t, **kw), fused(*t, forward_gradients=False, **kw)
    assert one[3] == SINGLE and two[3] == COMPOSITE
    assert torch.equal(one[0], two[0]) and one[1] == two[1]
    for a, b in zip(one[2], two[2]):
        assert a.dtype == dtype
        scale = float(b.double().abs().max())
        close(a.double() / scale, b.double() / scale, tol)


def test_schedule_choice():
    """The single pass needs grad mode, an input that requires grad and forward_gradients; with only
    the hidden states requiring grad it forms only their gradient; no-grad calls give the same loss."""
    t = head()
    kw = dict(loss_type="grpo", entropy_coef=0.01, temperature=0.7)
    h = t[0].clone().requires_grad_()
    loss, _ = rl.fused_linear_policy_loss(h, t[1], t[3], t[5], t[6], t[4], bias=t[2], **kw)
    assert type(loss.grad_fn).__name__ == SINGLE + "Backward"
    (g,) = torch.autograd.grad(loss, (h,))
    want = fused(*t, forward_gradients=False, **kw)
    close(g, want[2][0], 1e-12)
    with torch.no_grad():
        free, _ = rl.fused_linear_policy_loss(t[0], t[1], t[3], t[5], t[6], t[4], bias=t[2], **kw)
    assert free.grad_fn is None and torch.equal(free, want[0])


def test_all_masked_batch():
    t = head()
    mask = torch.zeros_like(t[4])
    one, two = fused(*t[:4], mask, *t[5:]), fused(*t[:4], mask, *t[5:], forward_gradients=False)
    assert one[3] == SINGLE
    assert torch.equal(one[0], two[0]) and float(one[0]) == 0.0
    for a, b in zip(one[2], two[2]):
        assert torch.equal(a, b) and not bool(a.any())


def test_packed_sequences(device):
    """Padding-free input ([1, N] with cu_seqlens) through the single pass equals the padded batch."""
    t = head(device=device)
    hidden, weight, bias, labels, mask, old, adv = t
    keep = mask.reshape(-1) != 0
    lens = mask.sum(1).long()
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=device), lens.cumsum(0)])
    packed = (hidden.reshape(-1, hidden.shape[-1])[keep][None], weight, bias, labels.reshape(-1)[keep][None], None,
              old.reshape(-1)[keep][None], adv)
    one = fused(*packed, loss_type="grpo", cu_seqlens=cu, entropy_coef=0.01, chunk_size=4)
    two = fused(*t, loss_type="grpo", entropy_coef=0.01, chunk_size=4)
    assert one[3] == two[3] == SINGLE
    close(one[0], two[0], 1e-12)
    close(one[2][1], two[2][1], 1e-10)
    close(one[2][0][0], two[2][0].reshape(-1, hidden.shape[-1])[keep], 1e-10)


def test_opcheck(device):
    from pyalign.ops.linear_policy import linear_policy_loss_fwd_grad_op
    t = head(device=device)
    hidden, weight, bias, labels, mask, old, adv = t
    bound = _POLICY_LOSS.bind(old.new_zeros(old.shape), old, adv, mask, entropy=old.new_zeros(old.shape),
                              loss_type="dapo", beta=0.04, ref_logps=old + 0.1, entropy_coef=0.01)
    bound.apply_defaults()
    args, _ = prepare(bound.arguments)
    H = hidden.shape[-1]
    lab = labels.masked_fill(mask == 0, -100).reshape(-1)
    op_args = (hidden.reshape(-1, H).clone().requires_grad_(), weight.clone().requires_grad_(),
               bias.clone().requires_grad_(), lab, 0.7, 1.0, 0.0, 4, NEED_HIDDEN | NEED_WEIGHT | NEED_BIAS, True,
               args[1], args[2], args[3], args[5], *args[6:])
    torch.library.opcheck(linear_policy_loss_fwd_grad_op.op, op_args)


def test_torch_compile_fullgraph_equals_eager():
    t = head()
    kw = dict(loss_type="dapo", beta=0.04, ref_logps=t[5] + 0.1, chunk_size=4)
    want = fused(*t, **kw)

    def step(h, w, b):
        return rl.fused_linear_policy_loss(h, w, t[3], t[5], t[6], t[4], bias=b, temperature=0.7, **kw)[0]
    leaves = [x.clone().requires_grad_() for x in t[:3]]
    loss = torch.compile(step, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    assert torch.equal(loss.detach(), want[0])
    for a, b in zip(grads, want[2]):
        assert torch.equal(a, b)


def test_single_pass_memory(device):
    """torch's allocator accounting (deterministic): the single pass holds the returned gradients
    (dW, dh) and, transiently, the saved dW's scaled copy, the chunk's logits buffer(s) and O(n H); no
    recompute, no [n, V] tensor (which would exceed the bound)."""
    B, T, H, V, chunk = 2, 128, 256, 32000, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 5).to(device)
    adv = torch.randn(B, generator=g).to(device)

    def run():
        loss, _ = rl.fused_linear_policy_loss(hidden, weight, labels, old, adv, loss_type="grpo", entropy_coef=0.01,
                                              chunk_size=chunk)
        return torch.autograd.grad(loss, (hidden, weight))
    if torch.device(device).type == "cuda":
        run()
    _, use = measure(run, device)
    n, dw = B * T, V * H * 4
    assert use.retained == dw + n * H * 4, use
    bound = 2 * dw + 2 * chunk * V * 4 + 8 * n * H * 4 + 2 ** 20
    assert use.peak <= bound, (use, bound)
    assert use.peak < 2 * dw + n * V * 4, use


def test_bad_input():
    t = head()
    hidden, weight, bias, labels, mask, old, adv = t
    with pytest.raises(TypeError, match="entropy"):
        rl.fused_linear_policy_loss(hidden, weight, labels, old, adv, entropy=old)
    with pytest.raises(TypeError, match="no_such_option"):
        rl.fused_linear_policy_loss(hidden.requires_grad_(), weight, labels, old, adv, no_such_option=1)
    with pytest.raises(ValueError, match="old_logps"):
        rl.fused_linear_policy_loss(hidden, weight, labels, old[:, :2], adv)
    with pytest.raises(ValueError, match="loss_type"):
        rl.fused_linear_policy_loss(hidden, weight, labels, old, adv, loss_type="nope")
    with pytest.raises(ValueError, match="labels"):
        rl.fused_linear_policy_loss(hidden, weight, labels + 100, old, adv)
