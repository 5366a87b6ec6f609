"""Fused ops: one file per op, holding its Triton kernels, their launch code and its
torch.library registration (schema, fake implementation, autograd)."""
