"""The dtype of what a reference autograd.Function's forward returns."""
import torch


def output_as(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """y (computed in fp32) in like's dtype. Not y.to(dtype) when y already has it: that returns y
    itself, and Dynamo in torch 2.11 then gives every input of the Function a zero gradient under
    torch.compile (the forward stays right; later torch is fixed)."""
    return y if y.dtype == like.dtype else y.to(like.dtype)
