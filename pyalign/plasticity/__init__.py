"""Brain-inspired plasticity: local learning rules, differentiable plasticity, consolidation.

Local rules update a weight ``W [out, in]`` in place from presynaptic activity ``x [..., in]`` and
postsynaptic activity ``y [..., out]``; leading dimensions are flattened into ``N`` samples and
the Hebbian terms are sample means. Every rule takes

    lr            learning rate (>= 0)
    weight_decay  Δw -= lr * weight_decay * w
    w_min, w_max  elementwise bounds, applied last (they always hold)
    norm          per-row norm target; ``norm_mode="max"`` rescales rows whose L2 norm exceeds it,
                  ``"exact"`` rescales every non-zero row to it (applied before the bounds)
    workspace     optional fp32 (fp64 for fp64 weights) ``[out, in]`` buffer reused for the matmul
                  result where one is formed: bf16/fp16 weights, Sanger, a per-sample
                  modulator (an fp32/fp64 weight of the other rules takes its product into
                  itself or its trace, and the workspace is checked but unused). Without one, a
                  CPU weight of 2^20 elements or more is updated by row blocks (each block's
                  product in a small reused buffer, still in cache for the update); rule objects
                  keep a workspace only where neither applies (CUDA bf16/fp16 weights, Sanger)

The matrix products go through ``torch.matmul`` (fp32 math for fp32/bf16/fp16 weights, fp64 for
fp64); everything elementwise around them (decay, Oja's ``-y^2 w``, traces, bounds, norm) is one
fused kernel that reads and writes the weight once. Activity is validated to be finite (a
non-finite value raises ValueError) when ``validate`` is True; the default is True on CPU and
False on CUDA, where the check would synchronize with the host.

Rules (Δw per update, ``<.>`` the mean over samples):
    hebb        Δw = lr <y x^T>
    oja         Δw = lr (<y x^T> - diag<y^2> W)                         (Oja 1982)
    sanger      Δw = lr (<y x^T> - tril(<y y^T>) W)                     (Sanger 1989, GHA)
    bcm         Δw = lr <y (y - θ) x^T>,  θ <- θ + (<y^2> - θ) / tau    (Bienenstock, Cooper, Munro 1982)
    anti_hebb   Δw = -lr <y x^T>                                        (Földiák 1990, decorrelation)
    soft_hebb   y = softmax(u / T), u = W x:  Δw = lr (<y x^T> - diag<y u> W)   (Moraitis et al. 2022)
    stdp        pair-based STDP with pre/post traces                    (Song, Miller, Abbott 2000)
                and optional triplet terms                              (Pfister & Gerstner 2006)
    three_factor e <- λ e + <y x^T>,  Δw = lr m e                       (Frémaux & Gerstner 2016)

Each rule also exists as an object holding its state (:class:`Oja`, :class:`BCM`, ...), with
``.step(weight, x, y)``; :func:`attach` hooks a rule to an ``nn.Linear`` so that forward passes
record ``x`` and ``y`` and ``rule.apply()`` updates the module's weight.

:class:`PlasticLinear` is a linear layer with a Hebbian fast weight trained by backprop
(differentiable plasticity, Miconi et al. 2018; backpropamine, Miconi et al. 2020).
:class:`EWC`, :class:`SynapticIntelligence` and :class:`MAS` are consolidation penalties for
continual training, each computing the penalty and adding its gradient in one pass per parameter.

Modules: ``rules`` (the functions), ``hooks`` (rule objects and :func:`attach`), ``plastic_linear``,
``consolidation``.
"""
from pyalign.plasticity.consolidation import EWC, MAS, SynapticIntelligence
from pyalign.plasticity.hooks import BCM, STDP, AntiHebb, Hebb, Oja, Rule, Sanger, SoftHebb, ThreeFactor, attach
from pyalign.plasticity.plastic_linear import PlasticLinear
from pyalign.plasticity.rules import anti_hebb, bcm, hebb, oja, sanger, soft_hebb, stdp, three_factor

__all__ = [
    "hebb", "oja", "sanger", "bcm", "anti_hebb", "soft_hebb", "stdp", "three_factor",
    "Rule", "Hebb", "Oja", "Sanger", "BCM", "AntiHebb", "SoftHebb", "STDP", "ThreeFactor", "attach",
    "PlasticLinear", "EWC", "SynapticIntelligence", "MAS",
]
