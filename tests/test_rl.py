"""Online RL (pyalign.rl): the fused policy-gradient loss against TRL's own GRPOTrainer._compute_loss
and the float64 reference (pyalign.reference.rl) for every loss type and option, packed sequences,
dtypes, gradcheck, opcheck, torch.compile, determinism, extreme values, bad input; KL estimators,
group advantages and the value loss."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyalign
from pyalign import rl
from pyalign.reference import rl as R

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "ppo", "cispo", "sapo", "vespo"]
TRL_TYPES = [t for t in LOSS_TYPES if t != "ppo"]
OPTIONS = [
    dict(),
    dict(importance_sampling_level="sequence"),
    dict(beta=0.1),
    dict(beta=0.1, use_bias_correction_kl=True),
    dict(beta=0.05, kl_estimator="k1+"),
    dict(entropy_coef=0.05, top_entropy_quantile=0.5),
    dict(entropy_coef=0.02),
    dict(importance_sampling_mode="token_truncate"),
    dict(importance_sampling_mode="token_mask", importance_sampling_clip_min=0.8, importance_sampling_clip_max=1.5),
    dict(importance_sampling_mode="sequence_mask", importance_sampling_clip_max=2.0),
    dict(importance_sampling_mode="sequence_truncate", importance_sampling_level="sequence"),
    dict(off_policy_mask_threshold=0.01),
    dict(delta=1.5, epsilon_high=0.28),
    dict(delta=1.1, epsilon_high=0.28),  # delta < 1 + epsilon_high: TRL never flags a high clip
    dict(num_items_in_batch=11),
    dict(max_completion_length=12),
    dict(loss_agg_mode="token-mean"),
    dict(loss_agg_mode="seq-mean-token-mean"),
    dict(loss_agg_mode="seq-mean-token-sum-norm"),
]


def batch(B=4, T=7, dtype=torch.float64, device="cpu", seed=1, per_token_adv=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * scale * r(B, T)
    ref = lp + 0.2 * scale * r(B, T)
    samp = old + 0.1 * r(B, T)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(B, T)
    if B > 1 and T > 4:
        mask[1, 4:] = 0
    if B > 3:
        mask[3] = 0  # an empty sequence
    adv = r(B, T) if per_token_adv else r(B)
    cast = lambda t: t.to(dtype).to(device)
    return dict(logps=cast(lp), old_logps=cast(old), ref_logps=cast(ref), sampling_logps=cast(samp), entropy=cast(ent),
                mask=mask.to(device), advantages=cast(adv))


def run(fn, b, loss_type, **kw):
    """Loss, metrics (floats) and the gradients w.r.t. logps and entropy of one implementation."""
    lp = b["logps"].clone().requires_grad_()
    ent = b["entropy"].clone().requires_grad_()
    loss, metrics = fn(lp, b["old_logps"], b["advantages"], b["mask"], loss_type=loss_type, ref_logps=b["ref_logps"],
                       entropy=ent, sampling_logps=b["sampling_logps"], **kw)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    floats = metrics.to_floats() if hasattr(metrics, "to_floats") else metrics
    z = torch.zeros_like(b["logps"])
    return loss.detach(), floats, z if g_lp is None else g_lp, z if g_ent is None else g_ent


def close(a, b, tol):
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    assert torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True), (a, b)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference(device, loss_type, opts):
    if opts.get("dual_clip") and loss_type != "ppo":
        pytest.skip("dual clip is ppo's")
    b = batch(device=device)
    got = run(rl.policy_loss, b, loss_type, **opts)
    cpu = {k: v.cpu() for k, v in b.items()}
    want = run(R.policy_loss, cpu, loss_type, **opts)
    close(got[0], want[0], 1e-10)
    close(got[2], want[2], 1e-10)
    close(got[3], want[3], 1e-10)
    for k, v in want[1].items():
        close(got[1][k], v, 1e-9)


def test_ppo_dual_clip_matches_reference(device):
    b = batch(device=device, per_token_adv=True, scale=4.0)
    for dual in (1.5, 3.0):
        got = run(rl.policy_loss, b, "ppo", dual_clip=dual, epsilon=0.1)
        want = run(R.policy_loss, {k: v.cpu() for k, v in b.items()}, "ppo", dual_clip=dual, epsilon=0.1)
        close(got[0], want[0], 1e-10)
        close(got[2], want[2], 1e-10)
    # the dual clip binds somewhere (else the test would not test it)
    plain = run(rl.policy_loss, b, "ppo", epsilon=0.1)
    assert not torch.equal(plain[0], run(rl.policy_loss, b, "ppo", dual_clip=1.5, epsilon=0.1)[0])


@pytest.mark.parametrize("opts", [o for o in OPTIONS if "loss_agg_mode" not in o], ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_matches_trl(loss_type, opts):
    """TRL 1.16's own GRPOTrainer._compute_loss is the contract: loss, gradient and logged metrics."""
    pytest.importorskip("trl")
    from trl_grpo_oracle import trl_policy_loss

    b = batch()
    opts = dict(opts)
    mode = opts.pop("importance_sampling_mode", None)
    lo, hi = opts.pop("importance_sampling_clip_min", None), opts.pop("importance_sampling_clip_max", 3.0)
    trl_kw = dict(opts)
    if "kl_estimator" in trl_kw:
        pytest.skip("TRL's GRPO uses k3 only")
    if mode is not None:
        trl_kw["importance_sampling_ratio"] = R.sampling_ratio(b["old_logps"], b["sampling_logps"], b["mask"], mode,
                                                               hi, lo)
    lp = b["logps"].clone().requires_grad_()
    want, want_m = trl_policy_loss(lp, b["old_logps"], b["advantages"], b["mask"].long(), loss_type=loss_type,
                                   ref_logps=b["ref_logps"], entropy=b["entropy"], sampling_logps=b["sampling_logps"],
                                   **trl_kw)
    (want_g,) = torch.autograd.grad(want, lp)
    got = run(rl.policy_loss, b, loss_type, importance_sampling_mode=mode, importance_sampling_clip_min=lo,
              importance_sampling_clip_max=hi, **opts)
    tol = 1e-7 if loss_type == "sapo" else 1e-10  # TRL forms SAPO's temperatures as fp32 tensors
    close(got[0], want.detach(), tol)
    close(got[2], want_g, tol)
    for k, v in want_m.items():
        if k in got[1]:
            close(got[1][k], v, 1e-6)  # TRL forms its metrics in fp32
    assert {k for k in want_m if k.startswith(("clip_ratio", "kl", "cispo", "vespo")) or k == "entropy"} <= set(got[1])


@settings(deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 9), loss_type=st.sampled_from(LOSS_TYPES), seq=st.booleans(),
       per_token=st.booleans(), seed=st.integers(0, 2**16), empty=st.floats(0, 1))
def test_hypothesis_shapes_and_masks(B, T, loss_type, seq, per_token, seed, empty):
    b = batch(B, T, seed=seed, per_token_adv=per_token)
    g = torch.Generator().manual_seed(seed + 1)
    b["mask"] = (torch.rand(B, T, generator=g) > empty).float()  # empty rows and all-masked batches included
    kw = dict(importance_sampling_level="sequence" if seq else "token", beta=0.05, entropy_coef=0.01)
    got, want = run(rl.policy_loss, b, loss_type, **kw), run(R.policy_loss, b, loss_type, **kw)
    close(got[0], want[0], 1e-10)
    close(got[2], want[2], 1e-10)
    close(got[3], want[3], 1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-6), (torch.float16, 2e-6)])
def test_low_precision_inputs(device, dtype, tol):
    """bf16/fp16/fp32 inputs are read once and accumulated in fp32: against the float64 reference on
    the same rounded inputs, fp32 rounding only. Results are fp32; gradients come back in the input dtype."""
    b = batch(device=device, dtype=dtype)
    for lt in ("dapo", "grpo", "sapo", "cispo"):
        got = run(rl.policy_loss, b, lt, beta=0.1, entropy_coef=0.01)
        want = run(R.policy_loss, {k: v.double().cpu() if v.is_floating_point() else v.cpu() for k, v in b.items()},
                   lt, beta=0.1, entropy_coef=0.01)
        assert got[0].dtype == torch.float32 and got[2].dtype == dtype
        close(got[0], want[0], tol)
        close(got[2], want[2], tol * 10 if dtype == torch.float32 else 2 ** -7)


def test_gradcheck(device):
    b = batch(B=3, T=5, device=device)
    for lt, kw in (("dapo", dict(beta=0.1, entropy_coef=0.1)), ("grpo", dict(importance_sampling_level="sequence")),
                   ("sapo", dict()), ("cispo", dict(beta=0.1, kl_estimator="k2")),
                   ("luspo", dict(use_bias_correction_kl=True, beta=0.2, importance_sampling_level="sequence"))):
        f = lambda lp, ent: rl.policy_loss(lp, b["old_logps"], b["advantages"], b["mask"], loss_type=lt,
                                           ref_logps=b["ref_logps"], entropy=ent, **kw)[0]
        assert torch.autograd.gradcheck(f, (b["logps"].clone().requires_grad_(), b["entropy"].clone().requires_grad_()))


def test_packed_sequences_equal_padded(device):
    """[1, N] with cu_seqlens gives the [B, T] + mask results, gradients included (padding-free)."""
    b = batch(device=device, per_token_adv=False)
    lens = b["mask"].sum(1).long()
    keep = b["mask"].bool()
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=device), lens.cumsum(0)])
    for lt, kw in (("grpo", dict()), ("dapo", dict(beta=0.1, entropy_coef=0.05)), ("bnpo", dict(importance_sampling_level="sequence")),
                   ("luspo", dict(off_policy_mask_threshold=0.01)), ("dr_grpo", dict(max_completion_length=7)),
                   ("vespo", dict(importance_sampling_mode="token_truncate"))):
        padded = run(rl.policy_loss, b, lt, **kw)
        packed_b = {k: (v[keep].unsqueeze(0) if v.dim() == 2 else v) for k, v in b.items()}
        packed_b["mask"] = None
        lp = packed_b["logps"].clone().requires_grad_()
        loss, m = rl.policy_loss(lp, packed_b["old_logps"], b["advantages"], cu_seqlens=cu, loss_type=lt,
                                 ref_logps=packed_b["ref_logps"], entropy=packed_b["entropy"],
                                 sampling_logps=packed_b["sampling_logps"], **kw)
        (g,) = torch.autograd.grad(loss, lp)
        close(loss, padded[0], 1e-12)
        close(g[0], padded[2][keep], 1e-12)
        assert m.to_floats()["num_tokens"] == padded[1]["num_tokens"]


def test_extreme_log_ratios_stay_finite(device):
    b = batch(device=device)
    b["old_logps"] = b["logps"] + torch.tensor([1e4, -1e4, 30.0, -30.0, 0.0, 5.0, -5.0], dtype=torch.float64,
                                                device=device)
    b["ref_logps"] = b["logps"] - 1e4
    for lt in LOSS_TYPES:
        for seq in ("token", "sequence"):
            loss, _, g, _ = run(rl.policy_loss, b, lt, beta=0.1, importance_sampling_level=seq)
            assert torch.isfinite(loss) and bool(torch.isfinite(g).all()), (lt, seq, loss)


def test_nan_in_a_kept_token_gives_nan_masked_nan_is_not_read(device):
    b = batch(device=device)
    b["logps"][1, 5] = float("nan")  # masked
    loss, _, g, _ = run(rl.policy_loss, b, "dapo")
    assert torch.isfinite(loss) and bool(torch.isfinite(g).all())
    b["logps"][0, 0] = float("nan")  # kept
    assert torch.isnan(run(rl.policy_loss, b, "dapo")[0])


def test_opcheck(device):
    from pyalign.ops.rl import params_list, policy_loss_op
    b = batch(device=device)
    flat = {k: v.reshape(-1) if v.dim() == 2 else v for k, v in b.items()}
    seg = torch.arange(0, 29, 7, device=device)
    params = params_list(epsilon_low=0.2, epsilon_high=0.28, delta=math.nan, dual_clip=math.nan, beta=0.1,
                         entropy_coef=0.01, entropy_threshold=math.nan, is_clip_min=-math.inf, is_clip_max=3.0,
                         off_policy_threshold=math.nan, horizon=7, num_items=math.nan, sapo_temperature_pos=1.0,
                         sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                         vespo_lambda_neg=2.0)
    for lt, level, mode in (("dapo", "token", "none"), ("grpo", "sequence", "token_truncate")):
        for segments in ((seg, 4, 0), (None, 4, 7)):  # offsets, or rows of 7 tokens
            args = (flat["logps"].clone().requires_grad_(), flat["old_logps"], flat["ref_logps"],
                    flat["sampling_logps"], flat["entropy"].clone().requires_grad_(), flat["mask"], flat["advantages"],
                    *segments, lt, level, "k3", mode, "by_type", False, False, params)
            torch.library.opcheck(policy_loss_op.op, args)


def test_eager_path_equals_custom_op():
    from pyalign.ops.rl import policy_loss_op
    b = batch()
    calls = []
    orig = policy_loss_op.op
    policy_loss_op.op = lambda *a: calls.append(1) or orig(*a)
    try:
        eager = run(rl.policy_loss, b, "dapo", beta=0.1)
        compiled = torch.compile(lambda lp, ent: rl.policy_loss(
            lp, b["old_logps"], b["advantages"], b["mask"], loss_type="dapo", beta=0.1, ref_logps=b["ref_logps"],
            entropy=ent, sampling_logps=b["sampling_logps"])[0], fullgraph=True)
        lp, ent = b["logps"].clone().requires_grad_(), b["entropy"].clone().requires_grad_()
        loss = compiled(lp, ent)
        g = torch.autograd.grad(loss, (lp, ent))
    finally:
        policy_loss_op.op = orig
    assert torch.equal(loss.detach(), eager[0]) and torch.equal(g[0], eager[2]) and torch.equal(g[1], eager[3])


def test_handed_over_gradient_survives_retain_graph_and_a_scaled_backward():
    # Eager calls hand the forward's gradients over to the first backward: a second backward
    # (retain_graph) and a scaled one must still give the exact gradients.
    b = batch()
    lp, ent = b["logps"].clone().requires_grad_(), b["entropy"].clone().requires_grad_()
    loss, _ = rl.policy_loss(lp, b["old_logps"], b["advantages"], b["mask"], loss_type="dapo", beta=0.1,
                             ref_logps=b["ref_logps"], entropy=ent, entropy_coef=0.02)
    loss.backward(retain_graph=True)
    g1 = lp.grad.clone(), ent.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(lp.grad, 2 * g1[0]) and torch.equal(ent.grad, 2 * g1[1])
    lp.grad.zero_()
    ent.grad.zero_()
    (3 * loss).backward()
    assert torch.equal(lp.grad, 3 * g1[0]) and torch.equal(ent.grad, 3 * g1[1])
    assert lp.grad.abs().sum() > 0 and ent.grad.abs().sum() > 0
    # The first backward's gradient is the caller's: changing it in place leaves a second one intact.
    loss, _ = rl.policy_loss(lp, b["old_logps"], b["advantages"], b["mask"], loss_type="dapo")
    g, = torch.autograd.grad(loss, lp, retain_graph=True)
    first = g.clone()
    g.mul_(0)
    assert torch.equal(torch.autograd.grad(loss, lp)[0], first) and first.abs().sum() > 0


def test_thread_count_determinism(tmp_path):
    script = ("import sys, torch, pyalign\n"
              "g = torch.Generator().manual_seed(0)\n"
              "lp = -torch.rand(300, 200, generator=g); old = lp + 0.1 * torch.randn(300, 200, generator=g)\n"
              "a = torch.randn(300, generator=g); lp.requires_grad_()\n"
              "l, m = pyalign.rl.policy_loss(lp, old, a, loss_type='grpo', importance_sampling_level='sequence')\n"
              "l.backward(); torch.save((l.detach(), m.values, lp.grad), sys.argv[1])\n")
    outs = []
    for threads in ("1", "2"):
        path = tmp_path / f"t{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": threads})
        outs.append(torch.load(path))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


def test_same_bits_on_every_instruction_set_and_thread_count(tmp_path):
    """The tiled CPU path (token-level configurations): its lane sums and branch-free stages give the
    same bits with the baseline, AVX2 and AVX-512 clones and with 1 or 2 threads."""
    script = ("import sys, torch, pyalign\n"
              "g = torch.Generator().manual_seed(0)\n"
              "lp = -torch.rand(5, 700, generator=g) * 3; old = lp + 0.2 * torch.randn(5, 700, generator=g)\n"
              "ref = lp + 0.1 * torch.randn(5, 700, generator=g); ent = torch.rand(5, 700, generator=g) * 2\n"
              "a = torch.randn(5, generator=g); mask = (torch.rand(5, 700, generator=g) < 0.8).float()\n"
              "out = []\n"
              "for kw in (dict(loss_type='dapo', beta=0.04, ref_logps=ref), dict(loss_type='sapo', entropy=ent,\n"
              "           entropy_coef=0.01), dict(loss_type='cispo', epsilon_high=1.2, beta=0.1, kl_estimator='k2',\n"
              "           ref_logps=ref)):\n"
              "    x = lp.clone().requires_grad_(); l, m = pyalign.rl.policy_loss(x, old, a, mask, **kw); l.backward()\n"
              "    out += [l.detach(), m.values, x.grad]\n"
              "torch.save(out, sys.argv[1])\n")
    levels = ("baseline", "avx2", "avx512")
    runs = [(isa, "1") for isa in levels[:levels.index(pyalign.cpu_isa()) + 1]] + [(pyalign.cpu_isa(), "2")]
    outs = []
    for isa, threads in runs:
        path = tmp_path / f"{isa}{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                       env={**os.environ, "PYALIGN_CPU_ISA": isa, "OMP_NUM_THREADS": threads})
        outs.append(torch.load(path))
    for other in outs[1:]:
        for a, e in zip(outs[0], other):
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


def test_bad_input():
    b = batch()
    lp, old, adv, mask = b["logps"], b["old_logps"], b["advantages"], b["mask"]
    cases = [
        (ValueError, "loss_type", dict(loss_type="reinforce")),
        (ValueError, "kl_estimator", dict(kl_estimator="k4", beta=0.1, ref_logps=b["ref_logps"])),
        (ValueError, "importance_sampling_mode", dict(importance_sampling_mode="token")),
        (ValueError, "sampling_logps: required", dict(importance_sampling_mode="token_mask")),
        (ValueError, "loss_agg_mode", dict(loss_agg_mode="mean")),
        (ValueError, "epsilon", dict(epsilon=-0.1)),
        (ValueError, "top_entropy_quantile", dict(top_entropy_quantile=0.0, entropy=b["entropy"])),
        (ValueError, "top_entropy_quantile", dict(top_entropy_quantile=1.5, entropy=b["entropy"])),
        (ValueError, "entropy: required", dict(entropy_coef=0.1)),
        (ValueError, "ref_logps: required", dict(beta=0.1)),
        (ValueError, "dual_clip", dict(dual_clip=3.0)),
        (ValueError, "delta", dict(delta=0.5)),
        (ValueError, "beta", dict(beta=float("nan"), ref_logps=b["ref_logps"])),
    ]
    for err, match, kw in cases:
        with pytest.raises(err, match=match):
            rl.policy_loss(lp, old, adv, mask, **kw)
    with pytest.raises(ValueError, match="old_logps: expected shape"):
        rl.policy_loss(lp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages: expected shape"):
        rl.policy_loss(lp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="mask: expected shape"):
        rl.policy_loss(lp, old, adv, mask[:2])
    with pytest.raises(ValueError, match="logps: expected shape"):
        rl.policy_loss(lp[0], old[0], adv, None)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rl.policy_loss(lp.reshape(1, -1), old.reshape(1, -1), adv[:3], cu_seqlens=torch.tensor([0, 5, 3, 28]))
    with pytest.raises(ValueError, match="offsets from 0 to 28"):
        rl.policy_loss(lp.reshape(1, -1), old.reshape(1, -1), adv, cu_seqlens=torch.tensor([0, 5, 9, 20, 27]))
    with pytest.raises(ValueError, match="max_completion_length: required"):
        rl.policy_loss(lp.reshape(1, -1), old.reshape(1, -1), adv, loss_type="dr_grpo",
                       cu_seqlens=torch.tensor([0, 5, 9, 20, 28]))
    with pytest.raises(TypeError, match="old_logps"):
        rl.policy_loss(lp, None, adv)


# ---- KL estimators, group advantages, value loss ----------------------------------------------------

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k1+", "k3+"])
def test_kl_penalty(device, estimator):
    g = torch.Generator().manual_seed(3)
    lp = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 3).to(device).requires_grad_()
    ref = torch.randn(4, 6, generator=g, dtype=torch.float64).to(device)
    got = rl.kl_penalty(lp, ref, estimator)
    d = (lp.detach() - ref).cpu()
    k3 = torch.exp(-d.clamp(-20, 20)) + d.clamp(-20, 20) - 1  # verl's closed forms and clamps
    closed = {"k1": d, "abs": d.abs(), "k2": 0.5 * d * d, "k3": k3.clamp(-10, 10)}[estimator.rstrip("+")]
    close(got.detach(), closed, 1e-12)
    (gg,) = torch.autograd.grad(got.sum(), lp)
    d = (lp.detach() - ref).cpu()
    if estimator.endswith("+") or estimator == "k2":
        close(gg, d, 1e-12)  # the gradient of k2
    elif estimator == "k1":
        close(gg, torch.ones_like(d), 0)
    if estimator.rstrip("+") == "k3":
        assert bool((got >= 0).all())  # k3 >= 0
    assert torch.isfinite(rl.kl_penalty(lp * 1e4, ref, estimator)).all()


def test_group_advantages_matches_trl_formula():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(12, generator=g)
    r[5] = float("nan")  # unscorable
    for scale in ("group", "batch", "none"):
        got = rl.group_advantages(r, 4, scale_rewards=scale)
        close(got, R.group_advantages(r, 4, scale_rewards=scale), 1e-6)
        assert got[5] == 0
    # by hand: group normalization with TRL's unbiased std + 1e-4
    grp = r[:4]
    close(rl.group_advantages(r, 4)[:4], (grp - grp.mean()) / (grp.std() + 1e-4), 1e-6)
    multi = torch.randn(2, 12, generator=g)
    for agg in ("sum_then_normalize", "normalize_then_sum"):
        close(rl.group_advantages(multi, 3, reward_weights=[1.0, 0.5], multi_objective_aggregation=agg),
              R.group_advantages(multi, 3, reward_weights=[1.0, 0.5], multi_objective_aggregation=agg), 1e-6)
    for est in ("rloo", "reinforce_pp"):
        close(rl.group_advantages(r, 4, estimator=est), R.group_advantages(r, 4, estimator=est), 1e-6)
    loo = rl.group_advantages(r[:4], 4, estimator="rloo")
    close(loo[0], r[0] - r[1:4].mean(), 1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        rl.group_advantages(r, 5)
    with pytest.raises(ValueError, match="reward_weights"):
        rl.group_advantages(multi, 3, reward_weights=[1.0])
    with pytest.raises(ValueError, match="estimator"):
        rl.group_advantages(r, 4, estimator="gae")


def test_value_loss(device):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    old = (v.detach() + 0.5 * torch.randn(3, 6, generator=g, dtype=torch.float64).to(device))
    ret = torch.randn(3, 6, generator=g, dtype=torch.float64).to(device)
    mask = torch.ones(3, 6, device=device)
    mask[2, 3:] = 0
    for mode in rl.LOSS_AGG_MODES:
        for c in (None, 0.2):
            loss, frac = rl.value_loss(v, old, ret, mask, cliprange_value=c, loss_agg_mode=mode)
            want, wfrac = R.value_loss(v.detach().cpu(), old.cpu(), ret.cpu(), mask.cpu(), cliprange_value=c,
                                       loss_agg_mode=mode)
            close(loss.detach(), want, 1e-12)
            assert abs(float(frac) - wfrac) < 1e-12
    assert torch.autograd.gradcheck(lambda x: rl.value_loss(x, old, ret, mask, cliprange_value=0.2)[0], (v,))


@pytest.mark.parametrize("opts", [dict(loss_type="dapo", beta=0.1), dict(loss_type="grpo", entropy_coef=0.05),
                                  dict(loss_type="sapo", top_entropy_quantile=0.6, entropy_coef=0.01),
                                  dict(loss_type="grpo", importance_sampling_level="sequence")])
def test_fused_linear_policy_loss_matches_eager_composition(device, opts):
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 6, 8, 23
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(device)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(device)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    mask[2, 4:] = 0
    old = -torch.rand(B, T, generator=g, dtype=torch.float64).to(device) * 3
    ref = old + 0.1
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(device)
    kw = dict(opts, ref_logps=ref) if opts.get("beta") else dict(opts)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = rl.fused_linear_policy_loss(*leaves[:2], labels, old, adv, mask, bias=leaves[2], temperature=0.7,
                                          chunk_size=4, **kw)
    got = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    z = torch.log_softmax((ref_leaves[0] @ ref_leaves[1].t() + ref_leaves[2]) / 0.7, -1)
    lp = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(z.exp() * z).sum(-1)
    want_loss, _ = rl.policy_loss(lp, old, adv, mask, entropy=ent, **kw)
    want = torch.autograd.grad(want_loss, ref_leaves)
    close(loss.detach(), want_loss.detach(), 1e-10)
    for a, b in zip(got, want):
        close(a, b, 1e-9)


@pytest.mark.parametrize("opts", [dict(loss_type="dapo", beta=0.04, epsilon_high=0.28),
                                  dict(loss_type="grpo", entropy_coef=0.02, top_entropy_quantile=0.7),
                                  dict(loss_type="cispo", epsilon_high=1.2, beta=0.1, kl_estimator="k2"),
                                  dict(loss_type="sapo", off_policy_mask_threshold=0.0),
                                  dict(loss_type="grpo", importance_sampling_level="sequence")])
def test_long_rows_across_tiles_match_reference(device, opts):
    """Rows longer than the CPU kernel's tiles (256 tokens), with masked tails: the tiled stages and
    their lane sums agree with the float64 reference in fp64 and to fp32 rounding in fp32."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        b = batch(B=3, T=700, device=device, seed=4, dtype=dtype)
        b["mask"][1, 300:] = 0
        b["mask"][2, :] = 0
        got = run(rl.policy_loss, b, **opts)
        want = run(R.policy_loss, {k: v.double().cpu() if v.is_floating_point() else v.cpu() for k, v in b.items()},
                   **opts)
        close(got[0], want[0], tol)
        close(got[2], want[2], tol)
        close(got[3], want[3], tol)
        for k, v in want[1].items():
            close(got[1][k], v, tol)


def test_readers_give_the_same_bits():
    """Contiguous inputs of one dtype (the typed readers) and strided ones (the generic reader) give
    bitwise the same loss, gradients and metrics."""
    b = batch(B=5, T=300, dtype=torch.float32, seed=3)
    strided = {k: torch.stack([v, v], -1)[..., 0] if v.dim() == 2 else v for k, v in b.items()}
    assert not strided["logps"].is_contiguous()
    for opts in (dict(loss_type="dapo", beta=0.1), dict(loss_type="sapo", entropy_coef=0.01)):
        x, y = run(rl.policy_loss, b, **opts), run(rl.policy_loss, strided, **opts)
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
        assert x[1].keys() == y[1].keys()
        assert all(x[1][k] == y[1][k] or (math.isnan(x[1][k]) and math.isnan(y[1][k])) for k in x[1])
