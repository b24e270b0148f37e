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
import types
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


_FUNCTIONS = ("linear_distillation_loss", "distillation_loss", "topk_distillation_loss",
              "linear_topk_distillation_loss")


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


# ---- a teacher server: linear_topk_distillation_loss, topk_distillation_loss, distillation_loss ------------

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


def _server_trainer(tmp_path, monkeypatch, name, student=None, **config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    server_distillation = pytest.importorskip("trl.experimental.server_distillation",
                                              reason="this TRL has no ServerDistillationTrainer")
    import trl.generation.vllm_client as vllm_client
    teacher = _TeacherServer(_teacher())
    monkeypatch.setattr(vllm_client, "VLLMClient", lambda **kw: teacher)
    args = server_distillation.ServerDistillationConfig(
        **_options(tmp_path, name, teacher_model_server_url="http://teacher:8000", **config))
    trainer = server_distillation.ServerDistillationTrainer(model=(student or _model)(), args=args,
                                                            train_dataset=_prompts(), processing_class=_tok())
    assert trainer.teacher_client is teacher
    return trainer


def _server(tmp_path, monkeypatch, use_pyalign, counting, **config):
    """Trains; also returns whether the student's LM head ever gave the logits of more than one position for
    more than one sequence at once (the [B, T, V] logits of a loss; generation gives [B, 1, V])."""
    trainer = _server_trainer(tmp_path, monkeypatch, f"server{use_pyalign}", **config)
    shapes = []
    trainer.model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    logs = _run(trainer, use_pyalign, counting)
    return logs, trainer, any(s[0] > 1 and s[1] > 1 for s in shapes)


def _compare_server(tmp_path, monkeypatch, counting, full_logits=True, **config):
    """TRL's run and pyalign's log the same; TRL's forms the student's [B, T, V] logits, pyalign's does where
    ``full_logits``."""
    ref, _, ref_full = _server(tmp_path, monkeypatch, False, None, **config)
    got, trainer, got_full = _server(tmp_path, monkeypatch, True, counting, **config)
    _same_logs(ref, got)
    assert ref_full, "TRL's server loss no longer forms the student's logits: update the test"
    assert got_full == full_logits
    return trainer


@pytest.mark.parametrize("tail", [True, False], ids=["bucket", "renormalize"])
def test_server_forward_kl_top_k_from_hidden_states(tmp_path, monkeypatch, tail):
    """Forward KL on the teacher's top 4 from the student's hidden states and LM head: its [B, T, V] logits
    are never formed (the LM head module runs only in generation and on the fixed probe sequence)."""
    trainer = _compare_server(tmp_path, monkeypatch, "linear_topk_distillation_loss", full_logits=False, beta=0.0,
                              loss_top_k=4, loss_add_tail=tail)
    assert not trainer.__dict__.get("_pyalign_reported")
    assert list(trainer._pyalign_server_scale.values()) == [1.0]


def test_server_reverse_kl_sampled_token_from_hidden_states(tmp_path, monkeypatch):
    trainer = _compare_server(tmp_path, monkeypatch, "linear_topk_distillation_loss", full_logits=False, beta=1.0,
                              loss_top_k=1)
    assert not trainer.__dict__.get("_pyalign_reported")


def _granite_biased():
    """A family whose forward divides the logits by ``logits_scaling`` (not a power of two), with a biased
    head: both folded into the hidden states (TRL's reading of the scale, checked against the forward)."""
    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, logits_scaling=1.3,
                                     pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = transformers.GraniteForCausalLM(cfg)
    model.lm_head = torch.nn.Linear(32, V, bias=True)
    return model


def _llama_config_scale():
    """A logit scale in the config that the model's forward ignores (Llama's): TRL's server loss reads the
    forward's logits, so the scale is 1."""
    model = _model()
    model.config.logit_scale = 1.7
    return model


@pytest.mark.parametrize("student, scale", [(_granite_biased, 1 / 1.3), (_llama_config_scale, 1.0)],
                         ids=["granite-biased", "config-only-scale"])
def test_server_logit_scale_and_bias(tmp_path, monkeypatch, student, scale):
    trainer = _compare_server(tmp_path, monkeypatch, "linear_topk_distillation_loss", full_logits=False,
                              student=student, beta=0.0, loss_top_k=4, gradient_accumulation_steps=2)
    assert not trainer.__dict__.get("_pyalign_reported")
    assert list(trainer._pyalign_server_scale.values()) == [scale]


def _logits_path_reasons(tmp_path, monkeypatch, caplog, student, **config):
    with caplog.at_level(logging.WARNING, logger="pyalign.integrations.trl"):
        _compare_server(tmp_path, monkeypatch, "topk_distillation_loss", student=student, **config)
    return [r.getMessage() for r in caplog.records if r.name == "pyalign.integrations.trl"]


def test_server_softcapped_student_from_logits(tmp_path, monkeypatch, caplog):
    """A student whose forward softcaps its logits (Gemma 2): linear_topk_distillation_loss has no softcap, so
    topk_distillation_loss reads the forward's logits, with the reason logged once."""
    def gemma2():
        torch.manual_seed(0)
        cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                        final_logit_softcapping=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        return transformers.Gemma2ForCausalLM(cfg)
    reasons = _logits_path_reasons(tmp_path, monkeypatch, caplog, gemma2, beta=0.0, loss_top_k=4)
    assert len(reasons) == 1 and "no softcap" in reasons[0], reasons


def test_server_logits_not_the_heads_from_logits(tmp_path, monkeypatch, caplog):
    """A forward that scales its logits by a factor the config does not name (here a hook on the head): the
    probe finds the logits are not the head's output, so topk_distillation_loss reads them, reason logged."""
    def hooked():
        model = _model()
        model.lm_head.register_forward_hook(lambda m, a, out: out * 1.5)
        return model
    reasons = _logits_path_reasons(tmp_path, monkeypatch, caplog, hooked, beta=1.0, loss_top_k=1)
    assert len(reasons) == 1 and "not its LM head's output" in reasons[0], reasons


@pytest.mark.parametrize("tail", [True, False], ids=["bucket", "renormalize"])
def test_server_jsd_top_1_support(tmp_path, monkeypatch, tail):
    """The JSD at 0 < beta < 1 reads the student's logits by design (distillation_loss on the top-1 support)."""
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
    bucket at ~1e-7 (pyalign's is exact, 0). The hidden-state path finds it (without the [B, T, V] logits),
    then forms the logits from the head for TRL's own loss, with the reason logged."""
    with caplog.at_level(logging.WARNING, logger="pyalign.integrations.trl"):
        _compare_server(tmp_path, monkeypatch, None, full_logits=False, beta=0.0, loss_top_k=V)
    reasons = [r.getMessage() for r in caplog.records if r.name == "pyalign.integrations.trl"]
    assert len(reasons) == 1 and "floors the student's tail" in reasons[0], reasons


def test_server_logits_at_ids_in_blocks():
    """The student's logits at the teacher's ids from the head's rows, a few rows per block, against the
    dense logits in float64."""
    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 1024), (3000, 1024), (3000,)))
    ids = torch.randint(0, 3000, (5, 2048), generator=g)  # 2 rows per block
    dense = h @ w.T + b
    torch.testing.assert_close(_trl_distill._logits_at(h, w, b, ids), dense.gather(-1, ids), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(_trl_distill._logits_at(h.view(1, 5, -1), w, None, ids.view(1, 5, -1))[0],
                               (h @ w.T).gather(-1, ids), rtol=1e-12, atol=1e-10)


def test_server_logit_scale_reading():
    """TRL's reading of the logit scale, attribute by attribute (as DistillationTrainer._compute_loss)."""
    cfg = lambda **kw: types.SimpleNamespace(model_type="x", **kw)
    assert _trl_distill._logit_scale(cfg()) == 1.0
    assert _trl_distill._logit_scale(cfg(logit_scale=None, output_multiplier=0.5)) == 0.5
    assert _trl_distill._logit_scale(cfg(lm_head_multiplier=3.0, logits_scaling=2.0)) == 3.0
    assert _trl_distill._logit_scale(cfg(logits_scaling=4.0)) == 0.25
    assert _trl_distill._logit_scale(types.SimpleNamespace(model_type="hyperclovax", logits_scaling=4.0)) == 4.0


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
