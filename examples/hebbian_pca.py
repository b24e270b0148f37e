"""Principal components by local Hebbian learning: Oja's rule (first component) and Sanger's
generalized Hebbian algorithm (the top k, in order), compared with numpy's SVD.

Data: scikit-learn's bundled 8x8 handwritten digits when scikit-learn is installed (64 features,
1797 images), otherwise correlated Gaussian data generated here with a known spectrum.

Run: ``python examples/hebbian_pca.py [--synthetic] [--k 4]`` (a few seconds on a 2-core CPU).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from pyalign import plasticity


def load_data(synthetic: bool, seed: int = 0) -> tuple[np.ndarray, str]:
    if not synthetic:
        try:
            from sklearn.datasets import load_digits
            return load_digits().data.astype(np.float64), "scikit-learn digits (1797 x 64)"
        except ImportError:
            pass
    rng = np.random.default_rng(seed)
    d = 32
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = 2.0 ** -np.arange(d / 2, step=0.5)  # well-separated eigenvalues
    x = (rng.standard_normal((4000, d)) * scales) @ basis.T
    return x, "synthetic Gaussian (4000 x 32, eigenvalues halving: 2^-i)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", action="store_true", help="use generated data even if scikit-learn is installed")
    p.add_argument("--k", type=int, default=4, help="number of components for Sanger's rule")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data, name = load_data(args.synthetic, args.seed)
    data = (data - data.mean(0)) / data.std()  # centered, one global scale
    _, s, vt = np.linalg.svd(data, full_matrices=False)
    x_all = torch.tensor(data, dtype=torch.float32)
    g = torch.Generator().manual_seed(args.seed)
    n_features = data.shape[1]

    w_oja = torch.randn(1, n_features, generator=g) * 0.1
    w_sanger = torch.randn(args.k, n_features, generator=g) * 0.1
    lr = 0.5 / float(s[0] ** 2 / len(data))  # step size relative to the top eigenvalue
    for epoch in range(args.epochs):
        step_lr = lr / (1 + epoch)
        for batch in x_all[torch.randperm(len(x_all), generator=g)].split(64):
            plasticity.oja(w_oja, batch, lr=step_lr)
            plasticity.sanger(w_sanger, batch, lr=step_lr)

    def cos(w, i):
        w = w.double().numpy()
        return abs(float(w @ vt[i] / np.linalg.norm(w)))

    print(f"data: {name}")
    result = {"oja": cos(w_oja[0], 0), "oja_norm": float(w_oja.norm()),
              "sanger": [cos(w_sanger[i], i) for i in range(args.k)]}
    print(f"Oja:    |cos(w, PC1)| = {result['oja']:.4f}, |w| = {result['oja_norm']:.4f} (converges to 1)")
    for i, c in enumerate(result["sanger"]):
        print(f"Sanger: |cos(w_{i}, PC{i + 1})| = {c:.4f}   (eigenvalue {s[i] ** 2 / len(data):.4f})")
    return result


if __name__ == "__main__":
    main()
