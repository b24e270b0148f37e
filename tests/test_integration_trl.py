"""pyalign inside TRL's DPOTrainer: a few steps with and without pyalign give the same losses and metrics.

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


def _run(tmp_path, use_pyalign, **config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", learning_rate=0.5, optim="sgd", bf16=False,
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


@pytest.mark.parametrize("config", [
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["ipo"], beta=0.5),
    dict(loss_type=["robust"], label_smoothing=0.2),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["sigmoid"], use_weighting=True),
    dict(loss_type=["hinge"], f_divergence_type="js_divergence"),
], ids=lambda c: "+".join(c["loss_type"]) + ("-wpo" if c.get("use_weighting") else "") +
   ("-" + c["f_divergence_type"] if "f_divergence_type" in c else ""))
def test_dpo_trainer_same_losses_and_metrics(tmp_path, config):
    ref = _run(tmp_path / "trl", False, **config)
    got = _run(tmp_path / "pyalign", True, **config)
    assert len(ref) == len(got) == 4
    for step, (a, b) in enumerate(zip(ref, got)):
        for k in METRICS:
            assert k in a and k in b, k
            assert b[k] == pytest.approx(a[k], rel=2e-3, abs=2e-4), f"step {step} {k}: trl {a[k]} vs pyalign {b[k]}"


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
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=0, eos_token_id=1, bos_token_id=2)
        model = transformers.LlamaForCausalLM(cfg)
        args = trl.KTOConfig(output_dir=str(tmp_path / str(use_pyalign)), per_device_train_batch_size=8, max_steps=3,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", learning_rate=0.5,
                             optim="sgd", bf16=False, seed=0)
        trainer = trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds,
                                 processing_class=_tokenizer())
        undo = patch_fused_lm_head() if use_pyalign else (lambda: None)
        try:
            trainer.train()
        finally:
            undo()
        return [h for h in trainer.state.log_history if "loss" in h]

    ref, got = run(False), run(True)
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        for k in ("loss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=2e-3, abs=2e-4), (k, a[k], b[k])
