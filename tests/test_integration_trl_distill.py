"""pyalign.distill inside TRL's GKDTrainer: patched with ``patch_trainer``, it logs the same losses and
gradient norms as TRL's own, step by step, for beta 0, 0.5 and 1 and a sampling temperature != 1.

Real training on CPU: tests/test_integration_trl.py's tiny randomly initialized Llama as the student
and a wider one (hidden size 48 against 32, the same vocabulary) as the teacher, a conversational
dataset, supervised batches (``lmbda=0``: no sampling, so the two runs see the same data), plain SGD in
fp32 so that round-off cannot flip an update. The hidden-state path (both heads reachable) and the
logits path (where they are not) are both checked.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install 'pyalign[trl]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
datasets = pytest.importorskip("datasets", reason="datasets is not installed")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd", reason="this TRL has no GKDTrainer")

from pyalign import distill  # noqa: E402
from pyalign.integrations import _trl_distill  # noqa: E402
from pyalign.integrations.trl import patch_trainer  # noqa: E402
from test_integration_trl import _TIMING, WORDS, _model, _tokenizer  # noqa: E402

STEPS = 3


def _same_logs(ref, got):
    """Every numeric entry TRL logged (except timings), the loss and the gradient norm among them, is
    logged by the pyalign run, equal to 1e-4 relative (the losses are ~1e-2 with random models, so a
    looser absolute tolerance would hide a wrong gradient)."""
    assert len(ref) == len(got) == STEPS
    for step, (a, b) in enumerate(zip(ref, got)):
        assert "loss" in a and "grad_norm" in a, "TRL no longer logs loss and grad_norm: update the test"
        for k, v in a.items():
            if k in _TIMING or not isinstance(v, (int, float)):
                continue
            assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-9), f"step {step} {k}: trl {v} vs pyalign {b[k]}"


def _teacher():
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=48, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _chats():
    g = torch.Generator().manual_seed(0)
    sent = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    return datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": sent(4)}, {"role": "assistant", "content": sent(int(torch.randint(2, 7, (1,),
                                                                                                  generator=g)))}]
        for _ in range(16)]})


class _Counting:
    """Counts the calls of one pyalign.distill function made through the integration."""

    def __init__(self, name):
        self.name, self.calls = name, 0

    def __enter__(self):
        self._orig = getattr(distill, self.name)

        def counted(*a, **kw):
            self.calls += 1
            return self._orig(*a, **kw)
        setattr(_trl_distill.distill, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(_trl_distill.distill, self.name, self._orig)


def _train(tmp_path, use_pyalign, beta, counting="linear_distillation_loss"):
    os.environ["HF_HUB_OFFLINE"] = "1"
    tok = _tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    args = gkd.GKDConfig(output_dir=str(tmp_path / f"out{use_pyalign}{beta}"), per_device_train_batch_size=4,
                         max_steps=STEPS, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         optim="sgd", learning_rate=0.5, bf16=False, seed=0, lmbda=0.0, beta=beta, temperature=0.7,
                         max_new_tokens=4)
    trainer = gkd.GKDTrainer(model=_model(), teacher_model=_teacher(), args=args, train_dataset=_chats(),
                             processing_class=tok)
    with _Counting(counting) as counter:
        if use_pyalign:
            patch_trainer(trainer)
        trainer.train()
    assert (counter.calls > 0) == use_pyalign
    assert trainer.teacher_model.lm_head.weight.grad is None, "the teacher got a gradient"
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_trainer_from_hidden_states(tmp_path, beta):
    ref = _train(tmp_path, False, beta)
    got = _train(tmp_path, True, beta)
    _same_logs(ref, got)


def test_gkd_trainer_logits_path(tmp_path, monkeypatch, caplog):
    """Where a model's head is not reachable (here: declared so), TRL's compute_loss runs with
    pyalign's divergence from the logits, and the reason is logged once."""
    monkeypatch.setattr(_trl_distill, "_head", lambda model: None)
    ref = _train(tmp_path, False, 0.5, counting="distillation_loss")
    with caplog.at_level(logging.WARNING, logger="pyalign.integrations.trl"):
        got = _train(tmp_path, True, 0.5, counting="distillation_loss")
    _same_logs(ref, got)
    reasons = [r.getMessage() for r in caplog.records if r.name == "pyalign.integrations.trl"]
    assert len(reasons) == 1 and "LM head is not reachable" in reasons[0], reasons
