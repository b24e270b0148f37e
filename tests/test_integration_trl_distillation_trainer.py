"""pyalign.distill inside TRL's DistillationTrainer and its experimental ServerDistillationTrainer: patched
with ``patch_trainer``, three training steps log the same losses, gradient norms and metrics as TRL's own
trainer (1e-4 relative), on each path pyalign takes, and the same as TRL where it falls back, with the reason
logged.

Real on-policy training on CPU with tests/test_integration_trl_distill.py's models (a tiny random Llama
student, a wider teacher of the same vocabulary): the student samples its completions (the seed fixes them;
both runs see the same ones), plain SGD in fp32. A local teacher exercises
``linear_distillation_loss`` (``beta`` 0, 0.5, 1 at temperature 0.7; logit scales, softcaps, a biased head
and gradient accumulation); a stand-in for the vLLM teacher server, answering from a local teacher,
exercises ``topk_distillation_loss`` (forward KL on the top-k, reverse KL on the sampled token, with the tail
bucket or renormalized) and ``distillation_loss`` (the JSD on the top-1 support).
"""
from __future__ import annotations

import logging
import os
from contextlib import ExitStack

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'pyalign[trl]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
datasets = pytest.importorskip("datasets", reason="datasets is not installed")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_distillation = pytest.importorskip("trl.trainer.distillation_trainer",
                                       reason="this TRL has no DistillationTrainer")

from pyalign.integrations import _trl_distill  # noqa: E402
from pyalign.integrations.trl import patch_trainer  # noqa: E402
from test_integration_trl import WORDS, _model, _tokenizer  # noqa: E402
from test_integration_trl_distill import STEPS, _Counting, _same_logs, _teacher  # noqa: E402

V = len(WORDS) + 3


def _prompts():
    g = torch.Generator().manual_seed(0)
    sent = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    return datasets.Dataset.from_dict({"prompt": [sent(int(torch.randint(2, 6, (1,), generator=g)))
                                                  for _ in range(16)]})


def _options(tmp_path, name, **config):
    return dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1,
                report_to=[], use_cpu=True, save_strategy="no", optim="sgd", learning_rate=0.5, bf16=False, seed=0,
                temperature=0.7, max_completion_length=5, **config)


def _tok():
    tok = _tokenizer()
    tok.padding_side = "left"
    return tok


_FUNCTIONS = ("linear_distillation_loss", "distillation_loss", "topk_distillation_loss")


def _run(trainer, use_pyalign, counting):
    """Trains; ``counting``: the pyalign.distill function the run must call (None: none of them)."""
    with ExitStack() as stack:
        counters = [stack.enter_context(_Counting(name)) for name in _FUNCTIONS]
        if use_pyalign:
            patch_trainer(trainer)
        trainer.train()
    calls = {c.name: c.calls for c in counters}
    expected = {name: use_pyalign and name == counting for name in _FUNCTIONS}
    assert {name: n > 0 for name, n in calls.items()} == expected, calls
    return [h for h in trainer.state.log_history if "loss" in h]


# ---- a local teacher: linear_distillation_loss ---------------------------------------------------------

def _local(tmp_path, use_pyalign, counting="linear_distillation_loss", models=None, **config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    student, teacher = models() if models else (_model(), _teacher())
    args = trl.DistillationConfig(**_options(tmp_path, f"local{use_pyalign}", **config))
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_prompts(),
                                      processing_class=_tok())
    logs = _run(trainer, use_pyalign, counting)
    assert teacher.lm_head.weight.grad is None, "the teacher got a gradient"
    return logs, trainer


def _compare_local(tmp_path, counting="linear_distillation_loss", models=None, **config):
    ref, _ = _local(tmp_path, False, None, models, **config)
    got, trainer = _local(tmp_path, True, counting, models, **config)
    assert "entropy" in ref[0], "TRL no longer logs the student's entropy: update the test"
    _same_logs(ref, got)
    return trainer


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_trainer_from_hidden_states(tmp_path, beta):
    trainer = _compare_local(tmp_path, beta=beta)
    assert not trainer.__dict__.get("_pyalign_reported")


def _scaled_capped_biased():
    """The student with a biased head and a softcap, the teacher with a logit scale that is not a power of
    two and its own softcap: TRL's loss reads both from the configs (the backbones ignore them)."""
    student, teacher = _model(), _teacher()
    torch.manual_seed(3)
    head = torch.nn.Linear(student.config.hidden_size, V, bias=True)
    head.weight.data.copy_(student.lm_head.weight.data)
    student.lm_head = head
    student.config.final_logit_softcapping = 2.0
    teacher.config.logit_scale = 1.7
    teacher.config.final_logit_softcapping = 3.0
    return student, teacher


def test_distillation_trainer_scales_softcaps_bias_accumulation(tmp_path):
    """Both sides' logit transforms (scale, then softcap, then temperature), the student's head bias (its
    gradient too) and TRL's num_items_in_batch normalization over two accumulation steps."""
    _compare_local(tmp_path, models=_scaled_capped_biased, beta=0.3, gradient_accumulation_steps=2)


def test_distillation_trainer_fallback_logs_reason(tmp_path, caplog):
    """A negative softcap (TRL's tanh cap is odd in it; pyalign refuses it) runs TRL's own
    _chunked_divergence_loss, with the reason logged once."""
    def models():
        student, teacher = _model(), _teacher()
        teacher.config.final_logit_softcapping = -3.0
        return student, teacher
    with caplog.at_level(logging.WARNING, logger="pyalign.integrations.trl"):
        trainer = _compare_local(tmp_path, counting=None, models=models, beta=0.5)
    reasons = [r.getMessage() for r in caplog.records if r.name == "pyalign.integrations.trl"]
    assert len(reasons) == 1 and "negative final_logit_softcapping" in reasons[0], reasons
    assert trainer._pyalign_reported


# ---- a teacher server: topk_distillation_loss, distillation_loss on the top-1 support ---------------------

class _TeacherServer:
    """Stands in for the vLLM server behind TRL's ``VLLMClient.get_sequence_logprobs``, answering from a local
    teacher: per completion token, the top-k log-probs of ``log_softmax(logits / temperature)`` with their ids,
    and the log-prob of the token in the sequence."""

    def __init__(self, teacher):
        self.teacher = teacher.eval()

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, **_):
        out = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
        for seq, p in zip(sequences, prompt_lengths):
            ids = torch.tensor([seq])
            with torch.no_grad():
                lp = torch.log_softmax(self.teacher(input_ids=ids).logits[0, p - 1:-1] / temperature, -1)
            top, completion = lp.topk(top_logprobs, -1), ids[0, p:, None]
            out["logprobs"].append(top.values.tolist())
            out["logprob_token_ids"].append(top.indices.tolist())
            out["actual_logprobs"].append(lp.gather(-1, completion).tolist())
            out["actual_token_ids"].append(completion.tolist())
        return out


def _server_trainer(tmp_path, monkeypatch, name, **config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    server_distillation = pytest.importorskip("trl.experimental.server_distillation",
                                              reason="this TRL has no ServerDistillationTrainer")
    import trl.generation.vllm_client as vllm_client
    teacher = _TeacherServer(_teacher())
    monkeypatch.setattr(vllm_client, "VLLMClient", lambda **kw: teacher)
    args = server_distillation.ServerDistillationConfig(
        **_options(tmp_path, name, teacher_model_server_url="http://teacher:8000", **config))
    trainer = server_distillation.ServerDistillationTrainer(model=_model(), args=args, train_dataset=_prompts(),
                                                            processing_class=_tok())
    assert trainer.teacher_client is teacher
    return trainer


def _server(tmp_path, monkeypatch, use_pyalign, counting, **config):
    trainer = _server_trainer(tmp_path, monkeypatch, f"server{use_pyalign}", **config)
    return _run(trainer, use_pyalign, counting), trainer


def _compare_server(tmp_path, monkeypatch, counting, **config):
    ref, _ = _server(tmp_path, monkeypatch, False, None, **config)
    got, trainer = _server(tmp_path, monkeypatch, True, counting, **config)
    _same_logs(ref, got)
    return trainer


@pytest.mark.parametrize("tail", [True, False], ids=["bucket", "renormalize"])
def test_server_forward_kl_top_k(tmp_path, monkeypatch, tail):
    trainer = _compare_server(tmp_path, monkeypatch, "topk_distillation_loss", beta=0.0, loss_top_k=4,
                              loss_add_tail=tail)
    assert not trainer.__dict__.get("_pyalign_reported")


def test_server_reverse_kl_sampled_token(tmp_path, monkeypatch):
    _compare_server(tmp_path, monkeypatch, "topk_distillation_loss", beta=1.0, loss_top_k=1)


@pytest.mark.parametrize("tail", [True, False], ids=["bucket", "renormalize"])
def test_server_jsd_top_1_support(tmp_path, monkeypatch, tail):
    _compare_server(tmp_path, monkeypatch, "distillation_loss", beta=0.5, loss_top_k=1, loss_add_tail=tail,
                    gradient_accumulation_steps=2)


def test_server_configuration_fallback_reasons(tmp_path, monkeypatch):
    """Configurations that TRL's config refuses but an edited trainer could hold go to TRL's own code."""
    trainer = _server_trainer(tmp_path, monkeypatch, "reasons", beta=0.5, loss_top_k=1)
    assert _trl_distill.distillation_fallback_reason(trainer) is None
    trainer.loss_top_k = 3
    assert "loss_top_k=3" in _trl_distill.distillation_fallback_reason(trainer)
    trainer.loss_top_k, trainer.reverse_kl_top_1_mode = 1, "argmax"
    assert "argmax" in _trl_distill.distillation_fallback_reason(trainer)


def test_server_fallback_logs_reason(tmp_path, monkeypatch, caplog):
    """The whole vocabulary as the 'top-k': the student's mass on it is 1, where TRL floors the student's tail
    bucket at ~1e-7 (pyalign's is exact, 0), so TRL's own loss runs, with the reason logged."""
    with caplog.at_level(logging.WARNING, logger="pyalign.integrations.trl"):
        _compare_server(tmp_path, monkeypatch, None, beta=0.0, loss_top_k=V)
    reasons = [r.getMessage() for r in caplog.records if r.name == "pyalign.integrations.trl"]
    assert len(reasons) == 1 and "floors the student's tail" in reasons[0], reasons


# ---- the pieces that match TRL's conventions --------------------------------------------------------------

def test_tail_floor_matches_trls_tail_bucket():
    """The teacher's top-k log-probs floored so that pyalign's exact tail equals the one TRL's clamp gives;
    the appended tail is TRL's own _add_tail_bucket."""
    server = pytest.importorskip("trl.experimental.server_distillation.server_distillation_trainer")
    lp = torch.tensor([[-1e-9, -30.0], [-0.1, -2.5], [0.0, -40.0], [-0.7, -0.7]], dtype=torch.float64)
    trl_full, _ = server._add_tail_bucket(lp, torch.ones_like(lp, dtype=torch.bool))
    floored = _trl_distill._floored(lp)
    tail = torch.log(-torch.expm1(torch.logsumexp(floored, -1)))
    torch.testing.assert_close(tail, trl_full[:, -1], rtol=1e-9, atol=0)
    assert (floored <= lp).all() and (lp - floored).max() <= 2e-7
    torch.testing.assert_close(floored[1:2], lp[1:2], rtol=0, atol=0)  # far from 1: unchanged
    torch.testing.assert_close(_trl_distill._with_tail(lp), trl_full, rtol=0, atol=0)


def test_patch_trainer_patches_once(tmp_path):
    args = trl.DistillationConfig(**_options(tmp_path, "once"))
    trainer = trl.DistillationTrainer(model=_model(), teacher_model=_teacher(), args=args,
                                      train_dataset=_prompts(), processing_class=_tok())
    patch_trainer(trainer)
    first = trainer._compute_loss
    patch_trainer(trainer)
    assert trainer._compute_loss is first
    assert _trl_distill.distillation_fallback_reason(trainer) is None
    # the rebuilt method calls pyalign's function, TRL's module keeps its own
    assert trl_distillation._chunked_divergence_loss is not _trl_distill.chunked_divergence_loss
    assert first.__func__.__globals__["_chunked_divergence_loss"].func is _trl_distill.chunked_divergence_loss
