"""Robust reductions and group weights of the preference losses: ``reduction="dro"`` (Dr. DPO's
KL-DRO over pairs) on every pairwise loss and :class:`pyalign.losses.GroupRobustWeights` (GRPO's
mirror-ascent group weights), against float64 references written from the papers' formulas, with
gradcheck, ``torch.compile``, checkpointing, bad input, and training on synthetic preference tasks
as evidence that each does what it is for."""
from __future__ import annotations

import io
import math

import pytest
import torch

from pyalign import losses as L
from pyalign.reference import losses as R


def _batch(n, seed, device, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 40, (n,), generator=g)
    lr = torch.randint(1, 40, (n,), generator=g)
    rc = -(torch.rand(n, generator=g, dtype=torch.float64) + 0.2) * lc
    rr = -(torch.rand(n, generator=g, dtype=torch.float64) + 0.2) * lr
    # log-probs of whole completions are < 0 (ORPO takes log(1 - p))
    pc = -(rc + torch.randn(n, generator=g, dtype=torch.float64) * spread).abs() - 0.01
    pr = -(rr + torch.randn(n, generator=g, dtype=torch.float64) * spread).abs() - 0.01
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    to = lambda t: t.to(device)
    return dict(pc=to(pc), pr=to(pr), rc=to(rc), rr=to(rr), lc=to(lc), lr=to(lr), w=to(w))


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _grads(loss, ts):
    gs = torch.autograd.grad(loss, ts, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, ts)]


def _close(a, e, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.double().cpu(), e.double().cpu(), rtol=rtol, atol=atol)


def _t(v):
    return torch.tensor(v, dtype=torch.float64)


def _plain_dro(per_pair, tau):
    """Dr. DPO's objective written as the paper states it: -tau log E[exp(-loss / tau)]."""
    return -tau * torch.log(torch.sum(torch.exp(-per_pair / tau)) / per_pair.shape[0])


# The pairwise losses, each as (pyalign call, reference per-pair losses) on leaves (pc, pr, rc, rr, w).
def _cases(b):
    lc, lr = b["lc"], b["lr"]
    return {
        "dpo_sigmoid": (lambda pc, pr, rc, rr, w, **kw: L.dpo_loss(pc, pr, rc, rr, weights=w, **kw),
                        lambda pc, pr, rc, rr: R.dpo_losses(pc, pr, rc, rr)),
        "dpo_mpo": (lambda pc, pr, rc, rr, w, **kw: L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo", "sft"],
                                                             loss_weights=[1.0, 0.3, 0.5], chosen_lengths=lc,
                                                             rejected_lengths=lr, weights=w, **kw),
                    lambda pc, pr, rc, rr: R.dpo_losses(pc, pr, rc, rr, loss_type=["sigmoid", "ipo", "sft"],
                                                        loss_weights=[1.0, 0.3, 0.5], chosen_lengths=lc,
                                                        rejected_lengths=lr)),
        "dpo_robust_ref_free": (lambda pc, pr, rc, rr, w, **kw: L.dpo_loss(pc, pr, loss_type="robust", label_smoothing=0.2,
                                                                         weights=w, **kw),
                                lambda pc, pr, rc, rr: R.dpo_losses(pc, pr, loss_type="robust", label_smoothing=0.2)),
        "cpo": (lambda pc, pr, rc, rr, w, **kw: L.cpo_loss(pc, pr, loss_type="sigmoid", cpo_alpha=0.5, weights=w, **kw),
                lambda pc, pr, rc, rr: R.cpo_losses(pc, pr, loss_type="sigmoid", cpo_alpha=0.5)[0]),
        "simpo": (lambda pc, pr, rc, rr, w, **kw: L.simpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, gamma=0.8,
                                                             weights=w, **kw),
                  lambda pc, pr, rc, rr: R.cpo_losses(pc, pr, loss_type="simpo", beta=2.0, gamma=0.8, cpo_alpha=0.0,
                                                      lc=lc, lr=lr)[0]),
        "orpo": (lambda pc, pr, rc, rr, w, **kw: L.orpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=0.25,
                                                           weights=w, **kw),
                 lambda pc, pr, rc, rr: R.orpo_losses(pc, pr, lc, lr, beta=0.25)[0]),
        "rm": (lambda pc, pr, rc, rr, w, **kw: L.reward_model_loss(pc / 20, pr / 20, margin=rc / 40,
                                                                 center_rewards_coefficient=0.01, weights=w, **kw),
               lambda pc, pr, rc, rr: R.rm_losses(pc / 20, pr / 20, margin=rc / 40, center=0.01)),
    }


CASES = list(_cases(_batch(1, 0, "cpu")))


# ------------------------------------------------------------------------------------------
# reduction="dro"

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tau", [0.3, 1.0, 5.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_dro_matches_plain_formula(device, case, tau, weighted):
    b = _batch(13, seed=1, device=device)
    fn, ref = _cases(b)[case]
    names = ["pc", "pr", "rc", "rr", "w"]
    xs, ys = _leaves(*[b[k] for k in names]), _leaves(*[b[k] for k in names])
    loss, metrics = fn(*xs[:4], xs[4] if weighted else None, reduction="dro", dro_temperature=tau)
    per = ref(*ys[:4])
    if weighted:
        per = per * ys[4]
    expected = _plain_dro(per, tau)
    _close(loss, expected)
    k = 5 if weighted else 4
    for a, e in zip(_grads(loss, xs[:k]), _grads(expected, ys[:k])):
        _close(a, e, rtol=1e-8, atol=1e-12)
    # the metrics are the kernel's, the same as for any other reduction
    _, m_mean = fn(*[t.detach() for t in xs[:4]], b["w"] if weighted else None)
    assert list(metrics) == list(m_mean) and torch.equal(metrics.values, m_mean.values)


def test_dro_gradient_is_softmax_of_negative_losses(device):
    """The documented property: pair i's gradient is its own loss gradient scaled by softmax(-l/tau)_i."""
    g = torch.Generator().manual_seed(2)
    rc = (torch.randn(40, generator=g, dtype=torch.float64) * 3).to(device)
    rr = (torch.randn(40, generator=g, dtype=torch.float64) * 3).to(device)
    for tau in (0.1, 1.0, 10.0):
        a, c = _leaves(rc, rr)
        loss, _ = L.reward_model_loss(a, c, reduction="dro", dro_temperature=tau)
        (ga,) = _grads(loss, [a])
        per = torch.nn.functional.softplus(-(rc - rr))       # -log sigmoid(r_c - r_r)
        dper = -torch.sigmoid(-(rc - rr))                    # its derivative w.r.t. r_c
        _close(ga / dper, torch.softmax(-per / tau, 0), rtol=1e-10)


def test_dro_limits_and_extremes(device):
    b = _batch(24, seed=3, device=device, spread=6.0)
    per, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], reduction="none")
    # tau -> inf: the mean (to second order, -Var(l) / (2 tau)); tau -> 0: the minimum (+ tau log N / k)
    big, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], reduction="dro", dro_temperature=1e7)
    _close(big, per.mean(), rtol=1e-6)
    small, _ = L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], reduction="dro", dro_temperature=1e-4)
    _close(small, per.min() + 1e-4 * math.log(24), rtol=1e-6)
    # monotone in tau between the two
    values = [L.dpo_loss(b["pc"], b["pr"], b["rc"], b["rr"], reduction="dro", dro_temperature=t)[0].item()
              for t in (1e-3, 0.1, 1.0, 10.0, 1e3)]
    assert all(x < y for x, y in zip(values, values[1:]))
    # float32, huge margins and extreme temperatures: finite loss and gradients
    for scale in (1.0, 1e4):
        for tau in (1e-6, 1.0, 1e12):
            pc, pr = _leaves(b["pc"].float() * scale, b["pr"].float())
            loss, _ = L.dpo_loss(pc, pr, b["rc"].float(), b["rr"].float(), beta=1.0, reduction="dro",
                                 dro_temperature=tau)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_dro_gradcheck(device):
    b = _batch(6, seed=4, device=device)
    lc, lr = b["lc"], b["lr"]
    fns = [
        lambda pc, pr, rc, rr, w: L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair"], weights=w,
                                             reduction="dro", dro_temperature=0.7)[0],
        lambda pc, pr, rc, rr, w: L.simpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, weights=w,
                                               reduction="dro", dro_temperature=2.0)[0],
        lambda pc, pr, rc, rr, w: L.orpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, weights=w,
                                              reduction="dro")[0],
        lambda pc, pr, rc, rr, w: L.reward_model_loss(pc / 20, pr / 20, margin=rc / 40, weights=w,
                                                      reduction="dro", dro_temperature=0.2)[0],
    ]
    xs = _leaves(b["pc"], b["pr"], b["rc"], b["rr"], b["w"])
    for fn in fns:
        assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_dro_second_backward_and_scaled_backward():
    """The op folds the DRO weights into the gradients it hands over: a second backward through a
    retained graph forms them again, and a scaled backward scales them."""
    b = _batch(50, seed=8, device="cpu")
    pc, pr = _leaves(b["pc"], b["pr"])
    loss, _ = L.dpo_loss(pc, pr, b["rc"], b["rr"], reduction="dro", dro_temperature=0.3)
    first = torch.autograd.grad(loss, (pc, pr), retain_graph=True)
    kept = [g.clone() for g in first]
    again = torch.autograd.grad(2.5 * loss, (pc, pr))
    assert all(torch.equal(a, 2.5 * k) for a, k in zip(again, kept))
    assert all(g.abs().sum() > 0 for g in kept)
    ys = _leaves(b["pc"], b["pr"])
    per, _ = L.dpo_loss(*ys, b["rc"], b["rr"], reduction="none")
    for a, e in zip(kept, _grads(_plain_dro(per, 0.3), ys)):
        _close(a, e, rtol=1e-8, atol=1e-12)


def test_dro_torch_compile_fullgraph(device):
    b = _batch(10, seed=5, device=device)

    def f(pc, pr, rc, rr, w):
        loss, m = L.dpo_loss(pc, pr, rc, rr, weights=w, reduction="dro", dro_temperature=0.5)
        return loss, m.values

    args = [b[k].float() for k in ("pc", "pr", "rc", "rr", "w")]
    xs, ys = _leaves(*args), _leaves(*args)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    l1, m1 = cf(*xs)
    l2, m2 = f(*ys)
    assert torch.equal(l1, l2) and torch.equal(m1, m2)
    for a, e in zip(_grads(l1, xs), _grads(l2, ys)):
        assert torch.equal(a, e)


def test_fused_linear_dpo_passes_dro_through():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (4, 5), generator=g)
    loss, _ = L.fused_linear_dpo_loss(hidden, weight, labels, reduction="dro", dro_temperature=0.5)
    import pyalign
    logps, _ = pyalign.logprob.linear_sequence_logprobs(hidden, weight, labels, shift=True)
    expected, _ = L.dpo_loss(logps[:2], logps[2:], reduction="dro", dro_temperature=0.5)
    _close(loss, expected)


def test_dro_bad_inputs():
    b = _batch(4, seed=7, device="cpu")
    pc, pr, rc, rr = b["pc"], b["pr"], b["rc"], b["rr"]
    desirable = torch.tensor([True, False, True, False])
    cases = [
        (ValueError, "dro_temperature: expected a finite number > 0", lambda: L.dpo_loss(pc, pr, reduction="dro", dro_temperature=0.0)),
        (ValueError, "dro_temperature: expected a finite number > 0", lambda: L.dpo_loss(pc, pr, reduction="dro", dro_temperature=-1.0)),
        (ValueError, "dro_temperature: expected a finite number > 0", lambda: L.cpo_loss(pc, pr, reduction="dro", dro_temperature=float("nan"))),
        (ValueError, "dro_temperature: expected a finite number > 0", lambda: L.reward_model_loss(pc, pr, reduction="dro", dro_temperature=float("inf"))),
        (ValueError, "dro_temperature: expected a finite number > 0", lambda: L.orpo_loss(pc, pr, chosen_lengths=b["lc"], rejected_lengths=b["lr"], reduction="dro", dro_temperature="1")),
        (ValueError, "dro_temperature: only used with reduction='dro'.*'mean'", lambda: L.dpo_loss(pc, pr, dro_temperature=0.5)),
        (ValueError, "dro_temperature: only used with reduction='dro'.*'none'", lambda: L.simpo_loss(pc, pr, chosen_lengths=b["lc"], rejected_lengths=b["lr"], reduction="none", dro_temperature=2.0)),
        (ValueError, "'dro' is not defined for aot", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="aot", reduction="dro")),
        (ValueError, "'dro' is not defined for aot", lambda: L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "aot_unpaired"], reduction="dro")),
        (ValueError, "reduction: expected one of 'none', 'mean', 'sum', 'dro', got 'kl_dro'", lambda: L.dpo_loss(pc, pr, reduction="kl_dro")),
        # the unpaired losses have no DRO reduction
        (ValueError, "reduction: expected one of", lambda: L.kto_loss(pc, rc, desirable, reduction="dro")),
        (ValueError, "reduction: expected one of", lambda: L.bco_loss(pc, rc, desirable, L.BCORunningMean(), reduction="dro")),
    ]
    for exc, pattern, fn in cases:
        with pytest.raises(exc, match=pattern):
            fn()


# ------------------------------------------------------------------------------------------
# GroupRobustWeights against a plain float64 reference

def _ref_step(alpha, losses, ids, eta, *, adjust=None, ema=None, started=None, gamma=None, train=True):
    """One call written with Python floats: returns (alpha, loss, d loss / d loss_i, ema, started)."""
    n_groups = len(alpha)
    members = [[i for i, g in enumerate(ids) if g == k] for k in range(n_groups)]
    means = [sum(losses[i] for i in m) / len(m) if m else 0.0 for m in members]
    alpha, ema, started = list(alpha), None if ema is None else list(ema), None if started is None else list(started)
    if train:
        for k in range(n_groups):
            if not members[k]:
                continue
            s = means[k]
            if ema is not None:
                ema[k] = (1 - gamma) * ema[k] + gamma * means[k] if started[k] else means[k]
                started[k] = True
                s = ema[k]
            alpha[k] *= math.exp(eta * (s + (adjust[k] if adjust else 0.0)))
        total = sum(alpha)
        alpha = [a / total for a in alpha]
    loss = sum(alpha[k] * means[k] for k in range(n_groups))
    grad = [alpha[g] / len(members[g]) for g in ids]
    return alpha, loss, grad, ema, started


@pytest.mark.parametrize("options", [{}, dict(initial_weights=[3.0, 1.0, 1.0, 5.0]),
                                     dict(size_adjustment=2.0, group_sizes=[400, 100, 25, 9]),
                                     dict(size_adjustment=[0.0, 1.0, 0.5, 3.0], group_sizes=[4, 4, 4, 4]),
                                     dict(loss_ema=0.3), dict(loss_ema=1.0, initial_weights=[1, 2, 3, 4])])
def test_group_weights_match_reference(device, options):
    G, eta = 4, 0.7
    gw = L.GroupRobustWeights(G, step_size=eta, dtype=torch.float64, **options).to(device)
    init = options.get("initial_weights", [1.0] * G)
    alpha = [x / sum(init) for x in init]
    adj = None
    if "size_adjustment" in options:
        c = options["size_adjustment"]
        c = [c] * G if isinstance(c, float) else c
        adj = [ck / math.sqrt(nk) for ck, nk in zip(c, options["group_sizes"])]
    gamma = options.get("loss_ema")
    ema, started = ([0.0] * G, [False] * G) if gamma is not None else (None, None)
    g = torch.Generator().manual_seed(8)
    for step in range(6):
        n = 5 + 3 * step
        # group 3 is absent from the first steps, group 0 from step 2
        ids = torch.randint(0, 3 if step < 2 else 4, (n,), generator=g)
        if step == 2:
            ids = ids.clamp_min(1)
        x = (torch.rand(n, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_(True)
        loss, m = gw(x, ids.to(device))
        (grad,) = _grads(loss, [x])
        alpha, ref_loss, ref_grad, ema, started = _ref_step(alpha, x.tolist(), ids.tolist(), eta, adjust=adj,
                                                            ema=ema, started=started, gamma=gamma)
        _close(gw.weights, _t(alpha))
        _close(loss, _t(ref_loss))
        _close(grad, _t(ref_grad))
        counts = [ids.tolist().count(k) for k in range(G)]
        for k in range(G):
            _close(m[f"group_weight/{k}"], _t(alpha[k]))
            _close(m[f"group_count/{k}"], _t(float(counts[k])))
            mean_k = sum(v for v, i in zip(x.tolist(), ids.tolist()) if i == k) / counts[k] if counts[k] else 0.0
            _close(m[f"group_loss/{k}"], _t(mean_k))
        present = [k for k in range(G) if counts[k]]
        _close(m["worst_group_loss"], _t(max(m[f"group_loss/{k}"].item() for k in present)))
        if gamma is not None:
            _close(gw.loss_ema, _t(ema))
            assert gw.ema_started.tolist() == started


def test_group_weights_low_precision_losses_and_dtypes(device):
    """bf16/fp16/fp32 losses are reduced in float32 and the loss is float32; gradients reach the
    input in its own dtype."""
    g = torch.Generator().manual_seed(9)
    x64 = torch.rand(30, generator=g, dtype=torch.float64).to(device)
    ids = torch.randint(0, 3, (30,), generator=g).to(device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gw = L.GroupRobustWeights(3, step_size=0.5).to(device)
        x = x64.to(dtype).requires_grad_(True)
        loss, m = gw(x, ids.int())
        loss.backward()
        assert loss.dtype == torch.float32 and m.values.dtype == torch.float32 and x.grad.dtype == dtype
        ref = L.GroupRobustWeights(3, step_size=0.5, dtype=torch.float64).to(device)
        ref_loss, _ = ref(x.detach().double(), ids)
        _close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        _close(gw.weights, ref.weights, rtol=1e-6, atol=1e-7)


def test_group_weights_gradcheck(device):
    """In eval mode the weights are constants and the loss is sum_g alpha_g mean_{i in g} l_i; in
    training mode the weights also depend on the losses, but as detached state (by design), so
    gradcheck applies to eval mode."""
    gw = L.GroupRobustWeights(3, step_size=0.3, initial_weights=[0.2, 0.5, 0.3], dtype=torch.float64).to(device)
    gw.eval()
    ids = torch.tensor([0, 2, 2, 1, 0, 2, 0], device=device)
    x = torch.rand(7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gw(t, ids)[0], (x,), eps=1e-6, atol=1e-8)
    # with a loss upstream: GRPO on DPO's per-pair losses
    b = _batch(7, seed=10, device=device)
    xs = _leaves(b["pc"], b["pr"], b["rc"], b["rr"])
    fn = lambda pc, pr, rc, rr: gw(L.dpo_loss(pc, pr, rc, rr, reduction="none")[0], ids)[0]
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-7)


def test_group_weights_eval_mode_does_not_update(device):
    gw = L.GroupRobustWeights(2, step_size=1.0, loss_ema=0.5).to(device)
    x = torch.tensor([0.1, 2.0, 3.0], device=device)
    ids = torch.tensor([0, 1, 1], device=device)
    gw.eval()
    before = {k: v.clone() for k, v in gw.state_dict().items()}
    loss, m = gw(x, ids)
    for k, v in gw.state_dict().items():
        assert torch.equal(v, before[k]), k
    _close(loss, _t(0.5 * 0.1 + 0.5 * 2.5), rtol=1e-6)
    gw.train()
    gw(x, ids)
    assert gw.weights[1] > gw.weights[0]
    gw.reset()
    for k, v in gw.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_group_weights_state_dict_round_trip(device):
    kw = dict(step_size=0.4, loss_ema=0.5, size_adjustment=1.0, group_sizes=[10, 20, 30])
    gw = L.GroupRobustWeights(3, **kw).to(device)
    g = torch.Generator().manual_seed(11)
    batches = [(torch.rand(9, generator=g).to(device), torch.randint(0, 3, (9,), generator=g).to(device))
               for _ in range(4)]
    for x, ids in batches[:2]:
        gw(x, ids)
    buf = io.BytesIO()
    torch.save(gw.state_dict(), buf)
    assert set(gw.state_dict()) == {"weights", "loss_ema", "ema_started"}
    buf.seek(0)
    other = L.GroupRobustWeights(3, **kw)
    other.load_state_dict(torch.load(buf))
    other.to(device)
    for x, ids in batches[2:]:
        l1, m1 = gw(x, ids)
        l2, m2 = other(x, ids)
        assert torch.equal(l1, l2) and torch.equal(m1.values, m2.values)
    assert torch.equal(gw.weights, other.weights)
    # .to(dtype) moves the floating state; without loss_ema the state is the weights alone
    assert gw.double().weights.dtype == torch.float64
    assert list(L.GroupRobustWeights(2).state_dict()) == ["weights"]


def test_group_weights_empty_groups_and_extremes(device):
    gw = L.GroupRobustWeights(5, step_size=0.5).to(device)
    x = torch.tensor([0.3, 0.7], device=device, requires_grad=True)
    loss, m = gw(x, torch.tensor([2, 2], device=device))
    loss.backward()
    assert torch.isfinite(m.values).all() and torch.isfinite(x.grad).all()
    assert m["group_count/0"] == 0 and m["group_loss/0"] == 0 and m["worst_group_loss"].item() == pytest.approx(0.5)
    # only the present group stepped: the absent four keep equal weights
    w = gw.weights
    assert torch.allclose(w[[0, 1, 3, 4]], w[0].expand(4)) and w[2] > w[0]
    _close(w.sum(), _t(1.0), rtol=1e-6)
    # huge losses do not overflow the step (it runs in log space); a single group is the plain mean
    big = L.GroupRobustWeights(2, step_size=10.0).to(device)
    loss, m = big(torch.tensor([1e4, 0.0], device=device), torch.tensor([0, 1], device=device))
    assert torch.isfinite(loss) and torch.isfinite(big.weights).all() and big.weights[0] == 1.0
    one = L.GroupRobustWeights(1, step_size=1.0).to(device)
    x = torch.rand(6, device=device)
    _close(one(x, torch.zeros(6, dtype=torch.long, device=device))[0], x.mean(), rtol=1e-6)


def test_group_weights_torch_compile_fullgraph(device):
    """The call, the weights' step and the running losses trace into one graph, equal to eager."""
    a = L.GroupRobustWeights(3, step_size=0.3, loss_ema=0.5).to(device)
    b = L.GroupRobustWeights(3, step_size=0.3, loss_ema=0.5).to(device)

    def f(mod, x, ids):
        loss, m = mod(x, ids)
        return loss, m.values

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(12)
    for _ in range(3):
        x = torch.rand(10, generator=g).to(device)
        ids = torch.randint(0, 3, (10,), generator=g).to(device)
        xa, xb = _leaves(x, x)
        la, ma = cf(a, xa, ids)
        lb, mb = f(b, xb, ids)
        assert torch.equal(la, lb) and torch.equal(ma, mb)
        assert torch.equal(_grads(la, [xa])[0], _grads(lb, [xb])[0])
    assert torch.equal(a.weights, b.weights) and torch.equal(a.loss_ema, b.loss_ema)


def test_group_weights_bad_inputs(device):
    G = L.GroupRobustWeights
    x = torch.rand(4, device=device)
    ids = torch.tensor([0, 1, 2, 1], device=device)
    gw = G(3).to(device)
    cases = [
        (ValueError, "n_groups: expected an int >= 1, got 0", lambda: G(0)),
        (TypeError, "n_groups: expected an int", lambda: G(2.0)),
        (TypeError, "n_groups: expected an int", lambda: G(True)),
        (ValueError, "step_size: expected a finite number > 0", lambda: G(2, step_size=0.0)),
        (ValueError, "step_size: expected a finite number > 0", lambda: G(2, step_size=-0.1)),
        (ValueError, "step_size: expected a finite number > 0", lambda: G(2, step_size=float("nan"))),
        (ValueError, "initial_weights: expected a number or 2 values", lambda: G(2, initial_weights=[1.0, 2.0, 3.0])),
        (ValueError, "initial_weights: expected finite values > 0", lambda: G(2, initial_weights=[1.0, 0.0])),
        (ValueError, "initial_weights: expected finite values > 0", lambda: G(2, initial_weights=torch.tensor([1.0, float("nan")]))),
        (TypeError, "initial_weights: expected a tensor or a sequence", lambda: G(2, initial_weights="uniform")),
        (ValueError, "group_sizes: required with size_adjustment > 0", lambda: G(2, size_adjustment=1.0)),
        (ValueError, "size_adjustment: expected finite values >= 0", lambda: G(2, size_adjustment=-1.0, group_sizes=[1, 1])),
        (ValueError, "group_sizes: expected finite values > 0", lambda: G(2, size_adjustment=1.0, group_sizes=[5, 0])),
        (ValueError, "group_sizes: expected a number or 2 values", lambda: G(2, group_sizes=[5, 1, 1])),
        (ValueError, "loss_ema: expected a finite number > 0", lambda: G(2, loss_ema=0.0)),
        (ValueError, "loss_ema: expected None or a number in \\(0, 1\\]", lambda: G(2, loss_ema=1.5)),
        (TypeError, "dtype: expected a floating torch.dtype", lambda: G(2, dtype=torch.int64)),
        (ValueError, "group_ids: expected values in \\[0, 3\\) \\(n_groups=3\\), got 3", lambda: gw(x, torch.tensor([0, 3, 1, 1], device=device))),
        (ValueError, "group_ids: expected values in \\[0, 3\\).*got -1", lambda: gw(x, torch.tensor([0, -1, 1, 1], device=device))),
        (TypeError, "group_ids: expected an int32 or int64 tensor", lambda: gw(x, ids.float())),
        (TypeError, "group_ids: expected an int32 or int64 tensor", lambda: gw(x, ids.bool())),
        (TypeError, "group_ids: expected a torch.Tensor", lambda: gw(x, [0, 1, 2, 1])),
        (ValueError, "group_ids: expected shape \\(4,\\)", lambda: gw(x, ids[:3])),
        (ValueError, "group_ids: expected shape \\(4,\\)", lambda: gw(x, ids[None])),
        (ValueError, "per_example_losses: expected a 1-d tensor \\[N\\]", lambda: gw(x[None], ids[None])),
        (ValueError, "per_example_losses: expected a 1-d tensor \\[N\\] with N >= 1", lambda: gw(x[:0], ids[:0])),
        (TypeError, "per_example_losses: expected a floating tensor", lambda: gw(ids, ids)),
        (TypeError, "per_example_losses: expected a torch.Tensor", lambda: gw([0.1, 0.2, 0.3, 0.4], ids)),
        (ValueError, "per_example_losses: contains NaN or infinite", lambda: gw(torch.tensor([0.1, float("nan"), 0.2, 0.3], device=device), ids)),
        (ValueError, "per_example_losses: contains NaN or infinite", lambda: gw(torch.tensor([0.1, float("inf"), 0.2, 0.3], device=device), ids)),
    ]
    if device == "cuda":
        cases.append((ValueError, "move the module with .to\\(device\\)", lambda: G(3)(x, ids)))
    for exc, pattern, fn in cases:
        with pytest.raises(exc, match=pattern):
            fn()
    # nothing above changed the state
    _close(gw.weights, torch.full((3,), 1 / 3), rtol=1e-6)


def test_group_weights_refuse_other_device_state():
    gw = L.GroupRobustWeights(2, device="meta")
    with pytest.raises(ValueError, match="GroupRobustWeights state is on meta"):
        gw(torch.rand(3), torch.tensor([0, 1, 1]))


# ------------------------------------------------------------------------------------------
# Evidence: training on synthetic preference tasks

def _pairs(g, n, direction):
    """n preference pairs of Gaussian features, labelled by the reward ``direction . x``."""
    d = direction.shape[0]
    chosen = torch.randn(n, d, generator=g, dtype=torch.float64)
    rejected = torch.randn(n, d, generator=g, dtype=torch.float64)
    swap = (chosen - rejected) @ direction < 0
    chosen[swap], rejected[swap] = rejected[swap].clone(), chosen[swap].clone()
    return chosen, rejected


def _group_task(seed, d=8, n=1000, minority=0.1):
    """Two groups whose preferences differ: the majority's reward direction e_0, the minority's
    (10% of the pairs) e_1, orthogonal to it; a held-out test set of 4000 pairs per group."""
    g = torch.Generator().manual_seed(seed)
    u = torch.eye(d, dtype=torch.float64)[:2]
    nb = round(minority * n)
    ca, ra = _pairs(g, n - nb, u[0])
    cb, rb = _pairs(g, nb, u[1])
    train = (torch.cat([ca, cb]), torch.cat([ra, rb]), torch.cat([torch.zeros(n - nb), torch.ones(nb)]).long())
    test = [_pairs(g, 4000, u[0]), _pairs(g, 4000, u[1])]
    return train, test


def _train_linear_reward(train, weights=None, steps=300, lr=0.1):
    chosen, rejected, groups = train
    theta = torch.zeros(chosen.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        per_pair, _ = L.reward_model_loss(chosen @ theta, rejected @ theta, reduction="none")
        loss = per_pair.mean() if weights is None else weights(per_pair, groups)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach()


def _worst_group_accuracy(theta, test):
    return min(float((((c - r) @ theta) > 0).double().mean()) for c, r in test)


def test_group_robust_weights_raise_worst_group_accuracy():
    """A linear Bradley-Terry reward model on two groups with orthogonal preference directions, the
    minority 10% of 1000 pairs (d = 8), 300 full-batch Adam steps. Held-out worst-group accuracy over
    seeds 0-4, measured: plain averaging 0.531 (0.513-0.543: it learns the majority's direction),
    GroupRobustWeights(step_size=0.1) 0.723 (0.692-0.742, uniform start), and the same 0.723 when the
    weights start at the group frequencies (0.9, 0.1), where the first step is plain averaging and
    only the mirror-ascent updates move the weights (to 0.46-0.53 for the minority at the end)."""
    plain, robust, from_erm = [], [], []
    for seed in range(5):
        train, test = _group_task(seed)
        plain.append(_worst_group_accuracy(_train_linear_reward(train), test))
        robust.append(_worst_group_accuracy(_train_linear_reward(train, L.GroupRobustWeights(2, step_size=0.1)), test))
        erm = L.GroupRobustWeights(2, step_size=0.1, initial_weights=[0.9, 0.1])
        from_erm.append(_worst_group_accuracy(_train_linear_reward(train, erm), test))
        assert erm.weights[1] > 0.4                      # moved from 0.1 towards balance
    for p, r, e in zip(plain, robust, from_erm):
        assert r > p + 0.12 and e > p + 0.12, (plain, robust, from_erm)
    assert sum(robust) / 5 > sum(plain) / 5 + 0.15


def test_dro_reduction_resists_flipped_labels():
    """A linear policy (log-probs ``x . theta``, reference-free sigmoid DPO, beta = 1) on 1000 pairs
    (d = 8) labelled by a true direction u, 30% of the labels flipped at random; 300 full-batch Adam
    steps. Angle between theta and u over seeds 0-5, measured: reduction="mean" 15.4 degrees
    (14.1-18.1), reduction="dro" with dro_temperature=1 7.3 degrees (4.1-13.4); dro is better on
    every seed, by 2.2 degrees or more. At the end of the dro training the reduction's weights
    softmax(-l / tau) give a flipped pair 0.07-0.14 times the weight of a clean one."""
    angles_mean, angles_dro = [], []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(8, generator=g, dtype=torch.float64)
        u /= u.norm()
        chosen, rejected = _pairs(g, 1000, u)
        flip = torch.randperm(1000, generator=g)[:300]
        chosen[flip], rejected[flip] = rejected[flip].clone(), chosen[flip].clone()
        for reduction, out in (("mean", angles_mean), ("dro", angles_dro)):
            theta = torch.zeros(8, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([theta], lr=0.05)
            kw = dict(dro_temperature=1.0) if reduction == "dro" else {}
            for _ in range(300):
                loss, _ = L.dpo_loss(chosen @ theta, rejected @ theta, beta=1.0, reduction=reduction, **kw)
                opt.zero_grad()
                loss.backward()
                opt.step()
            theta = theta.detach()
            out.append(math.degrees(math.acos(min(1.0, float(theta @ u / theta.norm())))))
        per_pair, _ = L.dpo_loss(chosen @ theta, rejected @ theta, beta=1.0, reduction="none")
        q = torch.softmax(-per_pair, 0)
        clean = torch.ones(1000, dtype=torch.bool)
        clean[flip] = False
        assert q[~clean].mean() < 0.5 * q[clean].mean()
    for m, d in zip(angles_mean, angles_dro):
        assert d < m - 1.0, (angles_mean, angles_dro)
    assert sum(angles_mean) / 6 > sum(angles_dro) / 6 + 5.0
