"""The op layer (pyalign.ops._op, pyalign._overrides, pyalign._ext): every op's eager fast path and its
registered custom op agree bitwise; the op path is taken whenever something could be tracing; the path
switches are context-local and follow a forward into its backward; descriptors keep their tensors
alive; the contract with the core is read by name."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import pyalign
from pyalign import _overrides
from pyalign._ext import CONTRACT, desc, kernels
from pyalign.ops import _op
from pyalign.ops.linear import linear_cross_entropy_fwd_grad_op, linear_token_logprobs_op
from pyalign.ops.logprob import token_logprobs_op
from pyalign.ops.uncertainty import reward_stats_op, token_uncertainty_op


def _leaf(t, device):
    return t.to(device).requires_grad_()


def _cases(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 37, generator=g)
    y = torch.randint(0, 37, (6,), generator=g)
    h, w = torch.randn(10, 8, generator=g), torch.randn(37, 8, generator=g)
    y10 = torch.randint(0, 37, (10,), generator=g)
    ens = torch.randn(3, 5, 37, generator=g)
    r = torch.randn(4, 9, generator=g)
    return [
        (token_logprobs_op, lambda: (_leaf(x, device), y.to(device), -100, 1.0, 1.0, 0.0, False, 15, False)),
        (linear_token_logprobs_op, lambda: (_leaf(h, device), _leaf(w, device), None, y10.to(device), -100, 0.8,
                                            1.0, 0.0, 1, 4)),
        (linear_cross_entropy_fwd_grad_op, lambda: (_leaf(h, device), _leaf(w, device), None, y10.to(device), -100,
                                                    1.0, 1.0, 0.0, 4, 0.1, 0.01, None, False, 3, True)),
        (token_uncertainty_op, lambda: (_leaf(ens, device), y[:5].to(device), 1.0, -100)),
        (reward_stats_op, lambda: (_leaf(r, device), None, None, 1.0, 0.25)),
    ]


def _grads(outputs, args):
    floats = [o for o in outputs if o.dtype.is_floating_point and o.requires_grad]
    loss = sum((o.double() * (k + 1)).sum() for k, o in enumerate(floats))
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("case", range(5))
def test_eager_path_equals_custom_op(device, case):
    op, make = _cases(device)[case]
    a1, a2 = make(), make()
    eager = op(*a1)
    assert all(o.grad_fn is None or op.name.split("::")[1] in type(o.grad_fn).__name__ for o in eager)
    registered = op.op(*a2)
    for e, r in zip(eager, registered):
        assert torch.equal(e, r)
    for ge, gr in zip(_grads(eager, a1), _grads(registered, a2)):
        assert torch.equal(ge, gr)


def test_op_path_is_taken_when_tracing():
    calls = []
    op, make = _cases("cpu")[0]
    orig = op.op
    op.op = lambda *a: calls.append(1) or orig(*a)
    try:
        args = make()
        op(*args)
        assert not calls  # eager: the function itself
        from torch.utils._python_dispatch import TorchDispatchMode

        class Passthrough(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        with Passthrough():
            op(*args)
        assert calls == [1]  # a dispatch mode may be tracing: the registered op
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            out = op(*fake)
        assert calls == [1, 1] and out[0].shape == (6,)
    finally:
        op.op = orig


def test_every_kernel_op_has_a_fake_kernel_and_a_pyalign_name():
    import pyalign.ops.linear.ops as linear_ops
    import pyalign.ops.logprob as logprob_ops
    import pyalign.ops.losses as loss_ops
    import pyalign.ops.plasticity as plasticity_ops
    import pyalign.ops.uncertainty as uncertainty_ops
    ops = [v for m in (linear_ops, logprob_ops, loss_ops, plasticity_ops, uncertainty_ops) for v in vars(m).values()
           if isinstance(v, _op.KernelOp)]
    assert len(ops) >= 13
    for op in ops:
        assert op.name.startswith("pyalign::") and hasattr(torch.ops.pyalign, op.name.split("::")[1])


def test_overrides_are_context_local_and_validated():
    assert _overrides.current() == _overrides.Overrides()
    seen = {}

    def other_thread():
        seen["other"] = _overrides.current().backward_order
    with pyalign.overrides(backward_order="vocab", gemm="blas"):
        assert _overrides.current().backward_order == "vocab"
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        with pyalign.overrides(gemm="auto"):
            assert _overrides.current() == _overrides.Overrides(backward_order="vocab")
        assert _overrides.current().gemm == "blas"
    assert seen["other"] is None  # another thread never sees this thread's switches
    assert _overrides.current() == _overrides.Overrides()
    for bad, err, match in ((dict(backward_order="rows"), ValueError, "backward_order"),
                            (dict(vocab_blocks=(0, 4)), ValueError, "vocab_blocks"),
                            (dict(gemm="mkl"), ValueError, "gemm"),
                            (dict(forward_gradients=1), TypeError, "forward_gradients"),
                            (dict(chunk=4), TypeError, "unknown switch 'chunk'")):
        with pytest.raises(err, match=match):
            with pyalign.overrides(**bad):
                pass


def test_forward_overrides_hold_in_the_backward():
    """A backward runs with the switches of its forward, even when it runs outside the ``with`` block
    (or on autograd's device thread)."""
    seen = []
    import pyalign.ops.linear.chunks as chunks
    orig = chunks.use_vocab_blocks

    def spy(weight, needs):
        seen.append(_overrides.current().backward_order)
        return orig(weight, needs)
    chunks.use_vocab_blocks = spy
    import pyalign.ops.linear.loops as loops
    loops.use_vocab_blocks = spy
    try:
        g = torch.Generator().manual_seed(1)
        h, w = torch.randn(12, 8, generator=g, requires_grad=True), torch.randn(40, 8, generator=g, requires_grad=True)
        y = torch.randint(0, 40, (12,), generator=g)
        with pyalign.overrides(backward_order="vocab", vocab_blocks=(5, 16)):
            lp = pyalign.linear_token_logprobs(h, w, y, chunk_size=4)
        lp.sum().backward()
    finally:
        chunks.use_vocab_blocks = orig
        loops.use_vocab_blocks = orig
    assert seen == ["vocab"]


def test_descriptor_keeps_its_tensor_alive():
    x = torch.randn(4, 9) * 3
    want = torch.log_softmax(x.double(), -1)[torch.arange(4), torch.tensor([1, 2, 3, 4])]
    temp = x.clone()
    ref = weakref.ref(temp)
    d = desc(temp, "logits")
    del temp
    gc.collect()
    assert ref() is not None  # held by the descriptor
    junk = [torch.full((4, 9), 1e4) for _ in range(8)]  # would reuse the block if it had been freed
    logp, lse = torch.empty(4), torch.empty(4)
    kernels.logprob_forward(d, desc(torch.tensor([1, 2, 3, 4]), "labels"), desc(logp, "logp"), desc(lse, "lse"),
                            None, None, None, None, 1.0, 1.0, 0.0, -100, 0, None)
    torch.testing.assert_close(logp.double(), want, rtol=0, atol=1e-5)
    del d, junk
    gc.collect()
    assert ref() is None


def test_contract_is_read_by_name():
    c = kernels.contract()
    assert c == CONTRACT and c["abi"] == pyalign._ext.ABI_VERSION
    assert {torch.float32: c["dtypes"]["float32"], torch.bool: c["dtypes"]["bool"]} == {
        torch.float32: pyalign._ext.DTYPE_CODES[torch.float32], torch.bool: pyalign._ext.DTYPE_CODES[torch.bool]}
    assert set(c["loss_metrics"]) == set(c["loss_families"])
    for family, slots in c["loss_metrics"].items():
        assert all(0 <= s < c["metric_slots"] for s in slots.values()), family
        assert len(set(slots.values())) == len(slots), family  # one slot per name
    _, m = pyalign.losses.kto_loss(torch.randn(6), torch.randn(6), torch.tensor([1, 0, 1, 1, 0, 0]).bool())
    assert m.to_floats()["count/chosen"] == 3.0 and m.to_floats()["count/rejected"] == 3.0
