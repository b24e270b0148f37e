"""torch.library custom ops over pyalign._C (autograd and fake kernels); see each family's module."""
