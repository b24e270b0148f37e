"""pyalign inside TRL's trainers: a few steps with and without pyalign give the same losses and metrics.

DPOTrainer: every loss type TRL offers, the f-divergences (including the length-normalized ipo and
sigmoid_norm, where the constants of f' matter), label smoothing as TRL applies it, WPO weighting.
KTOTrainer and GRPOTrainer: pyalign's fused head under TRL's own losses.

Uses a tiny randomly initialized Llama built from a config and a word-level tokenizer built in the
test, so nothing is downloaded.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'pyalign[trl]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
datasets = pytest.importorskip("datasets", reason="datasets is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

from pyalign.integrations.trl import PyalignChunkedLogProb, patch_fused_lm_head, patch_trainer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>")


def _dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sent = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    lengths = lambda: int(torch.randint(2, 7, (1,), generator=g))
    return datasets.Dataset.from_dict({
        "prompt": [sent(4) for _ in range(n)],
        "chosen": [" " + sent(lengths()) for _ in range(n)],
        "rejected": [" " + sent(lengths()) for _ in range(n)],
    })


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _run(tmp_path, use_pyalign, **config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = _model()
    config = {"learning_rate": 0.5, **config}
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", optim="sgd", bf16=False,
                         seed=0, **config)
    # fp32 (no CPU autocast to bf16, where both heads round their logits to bf16 and differ at that
    # precision) and plain SGD: Adam's first steps follow only the sign of each gradient entry, so round-off-level
    # differences in near-zero gradients would decide them.
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=_dataset(),
                             processing_class=_tokenizer())
    undo = None
    if use_pyalign:
        import trl.trainer.utils as trl_utils
        original = trl_utils._ChunkedLogProbFunction
        patch_trainer(trainer)
        assert trl_utils._ChunkedLogProbFunction is PyalignChunkedLogProb
        undo = lambda: setattr(trl_utils, "_ChunkedLogProbFunction", original)
    try:
        trainer.train()
    finally:
        if undo:
            undo()
    return [h for h in trainer.state.log_history if "loss" in h]


METRICS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"]


def _config_id(c):
    parts = ["+".join(c["loss_type"])]
    if c.get("use_weighting"):
        parts.append("wpo")
    if "f_divergence_type" in c:
        parts.append(c["f_divergence_type"])
    if c.get("label_smoothing"):
        parts.append(f"ls{c['label_smoothing']}")
    return "-".join(parts)


DPO_CONFIGS = [
    # every loss type TRL's DPOTrainer offers
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["hinge"]),
    dict(loss_type=["ipo"], beta=0.5),
    dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    dict(loss_type=["nca_pair"]),
    dict(loss_type=["robust"], label_smoothing=0.2),
    dict(loss_type=["bco_pair"]),
    dict(loss_type=["sppo_hard"], beta=2.0, learning_rate=0.05),  # a squared loss of size 1/beta^2
    dict(loss_type=["aot"], label_smoothing=0.1),
    dict(loss_type=["aot_unpaired"]),
    dict(loss_type=["apo_zero"]),
    dict(loss_type=["apo_down"]),
    dict(loss_type=["discopop"], discopop_tau=0.2),  # a non-default tau must reach the loss
    dict(loss_type=["sft"]),
    dict(loss_type=["sigmoid_norm"], beta=0.5),
    # lists, WPO
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["sigmoid"], use_weighting=True),
    # f-divergences; with ipo and sigmoid_norm the constants of f'(u) do not cancel
    dict(loss_type=["hinge"], f_divergence_type="js_divergence"),
    dict(loss_type=["ipo"], beta=0.5, f_divergence_type="forward_kl"),
    dict(loss_type=["ipo"], beta=0.5, f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid_norm"], beta=0.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["sigmoid", "discopop"], f_divergence_type="forward_kl"),
    # label smoothing as TRL applies it: not to sigmoid or hinge, to robust / exo_pair / aot only
    dict(loss_type=["sigmoid"], label_smoothing=0.1),
    dict(loss_type=["hinge"], label_smoothing=0.1),
    dict(loss_type=["sigmoid", "robust"], label_smoothing=0.2),
    dict(loss_type=["aot_unpaired"], label_smoothing=0.7),  # outside pyalign's range: TRL's own loss
]


@pytest.mark.parametrize("config", DPO_CONFIGS, ids=_config_id)
def test_dpo_trainer_same_losses_and_metrics(tmp_path, config):
    ref = _run(tmp_path / "trl", False, **config)
    got = _run(tmp_path / "pyalign", True, **config)
    assert len(ref) == len(got) == 4
    for step, (a, b) in enumerate(zip(ref, got)):
        for k in METRICS:
            assert k in a and k in b, k
            assert b[k] == pytest.approx(a[k], rel=2e-3, abs=2e-4), f"step {step} {k}: trl {a[k]} vs pyalign {b[k]}"


def test_patched_dpo_loss_is_pyaligns(tmp_path, monkeypatch):
    """The patched trainer's loss goes through pyalign.losses.dpo_loss (once per smoothing group)."""
    import pyalign.losses

    calls = []
    real = pyalign.losses.dpo_loss

    def spy(*a, **kw):
        calls.append((tuple(kw["loss_type"]), kw["label_smoothing"]))
        return real(*a, **kw)

    monkeypatch.setattr(pyalign.losses, "dpo_loss", spy)
    _run(tmp_path, True, loss_type=["sigmoid", "robust"], label_smoothing=0.2)
    assert calls and set(calls) == {(("robust",), 0.2), (("sigmoid",), 0.0)}


def test_fused_head_adapter_matches_trl_kernel():
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    outs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    a = ChunkedLogProbFunction.apply(h, w, None, y, 0.7, 16, 30.0, 1.5, outs)
    b = PyalignChunkedLogProb.apply(h, w, None, y, 0.7, 16, 30.0, 1.5, outs)
    for x, z in zip(a[:4], b[:4]):
        torch.testing.assert_close(z, x, atol=2e-5, rtol=1e-5)
    assert torch.equal(a[4], b[4])
    ga = torch.autograd.grad(a[0].sum() + a[1].sum(), (h, w))
    gb = torch.autograd.grad(b[0].sum() + b[1].sum(), (h, w))
    for x, z in zip(ga, gb):
        torch.testing.assert_close(z, x, atol=1e-4, rtol=1e-4)


def test_patch_fused_lm_head_undo():
    import trl.trainer.utils as trl_utils
    original = trl_utils._ChunkedLogProbFunction
    undo = patch_fused_lm_head()
    assert trl_utils._ChunkedLogProbFunction is PyalignChunkedLogProb
    undo()
    assert trl_utils._ChunkedLogProbFunction is original


def test_kto_trainer_with_pyalign_head(tmp_path):
    """The same head patch serves KTOTrainer (TRL's KTO loss, pyalign's log-probs)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    g = torch.Generator().manual_seed(1)
    sent = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    ds = datasets.Dataset.from_dict({"prompt": [sent(4) for _ in range(16)],
                                     "completion": [" " + sent(3) for _ in range(16)],
                                     "label": [bool(i % 2) for i in range(16)]})

    def run(use_pyalign):
        model = _model()
        args = trl.KTOConfig(output_dir=str(tmp_path / str(use_pyalign)), per_device_train_batch_size=8, max_steps=3,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", learning_rate=0.5,
                             optim="sgd", bf16=False, seed=0)
        trainer = trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds,
                                 processing_class=_tokenizer())
        with _counting_head(use_pyalign) as calls:
            trainer.train()
        assert (calls[0] > 0) == use_pyalign
        return [h for h in trainer.state.log_history if "loss" in h]

    ref, got = run(False), run(True)
    _same_logs(ref, got, 3, required=("loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected",
                                      "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"))


class _counting_head:
    """patch_fused_lm_head (when `use`) with a count of the calls into pyalign's head."""

    def __init__(self, use):
        self.use, self.calls, self.undo = use, [0], None

    def __enter__(self):
        if self.use:
            self.undo = patch_fused_lm_head()
            self._apply = PyalignChunkedLogProb.apply

            def counted(*a, **kw):
                self.calls[0] += 1
                return self._apply(*a, **kw)
            PyalignChunkedLogProb.apply = staticmethod(counted)
        return self.calls

    def __exit__(self, *exc):
        if self.use:
            PyalignChunkedLogProb.apply = staticmethod(self._apply)
            self.undo()


_TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _same_logs(ref, got, steps, required):
    """Every numeric entry TRL logged (except timings) is logged by the pyalign run, equal to 2e-3."""
    assert len(ref) == len(got) == steps
    for step, (a, b) in enumerate(zip(ref, got)):
        for k in required:
            assert k in a, f"TRL no longer logs {k!r}: update the test"
        for k, v in a.items():
            if k in _TIMING or not isinstance(v, (int, float)):
                continue
            assert k in b, f"step {step}: {k!r} missing in the pyalign run"
            assert b[k] == pytest.approx(v, rel=2e-3, abs=2e-4), f"step {step} {k}: trl {v} vs pyalign {b[k]}"


def test_grpo_trainer_with_pyalign_head(tmp_path):
    """GRPOTrainer (policy and reference log-probs through the fused head, a trivial reward):
    TRL's GRPO loss on pyalign's head equals TRL's loss on its own head, step by step."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    g = torch.Generator().manual_seed(2)
    ds = datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (4,),
                                                                                          generator=g).tolist())
                                                for _ in range(16)]})

    def reward(completions, **kw):  # longer completions and the word w1 score higher
        return [len(c.split()) / 4 + c.count("w1") for c in completions]

    def run(use_pyalign):
        # From a saved checkpoint: with beta > 0 GRPOTrainer loads its reference model from the path.
        path = tmp_path / f"model{use_pyalign}"
        _model().save_pretrained(path)
        args = trl.GRPOConfig(output_dir=str(tmp_path / f"out{use_pyalign}"), per_device_train_batch_size=4,
                              num_generations=4, max_completion_length=6, max_steps=3, logging_steps=1, report_to=[],
                              use_cpu=True, save_strategy="no", learning_rate=0.5, optim="sgd", bf16=False, seed=0,
                              beta=0.1)
        trainer = trl.GRPOTrainer(model=str(path), reward_funcs=reward, args=args, train_dataset=ds,
                                  processing_class=_tokenizer())
        with _counting_head(use_pyalign) as calls:
            trainer.train()
        assert (calls[0] > 0) == use_pyalign
        return [h for h in trainer.state.log_history if "loss" in h]

    ref, got = run(False), run(True)
    _same_logs(ref, got, 3, required=("loss", "grad_norm", "kl", "entropy", "reward"))
