"""Fused Triton kernels of interformer-kernels (installed as ``interformer.kernels``).

One file per op family; each exposes functions with the same names and signatures as the eager
references in :mod:`interformer.reference`, registered with ``torch.library`` under the
``interformer`` namespace. Importing this package does not import Triton; importing an op module does.
"""
