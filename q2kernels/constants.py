"""Numeric constants shared by the eager reference and the Triton kernels (docs/math.md): defined
once here, so the oracle and the kernel it checks cannot drift apart. Plain Python floats; a kernel
wraps the ones it needs in tl.constexpr."""
import torch

# Fake quantization (docs/math.md §1-3): the step is floored, s' = max(s, SCALE_FLOOR).
SCALE_FLOOR = 1e-8

# N2UQ (docs/math.md §4): a+ = a if a > A_FLOOR else A_FLOOR, with 1e-3 rounded to fp32 (the
# authors' eps is an fp32 tensor).
A_FLOOR = float(torch.tensor(1e-3, dtype=torch.float32))

# Q-ADA (docs/math.md §6). "simam" form: delta = |Sq - S| / (Delta + DISTORTION_EPS); "q2" form:
# z = |X - mu| / (sd + KAPPA), r = |X - Xq| / (Delta + KAPPA).
DISTORTION_EPS = 1e-6
KAPPA = 1e-6

# Gated fusion + LayerNorm (docs/math.md §5).
LAYERNORM_EPS = 1e-5     # y = (h - mu)/sqrt(var + eps)*gamma + beta
GATE_EMA_WEIGHT = 0.1    # the controller's beta: Gbar <- (1 - beta)*Gbar + beta*G
GATE_ETA = 0.05          # theta <- theta - eta*e
GATE_LOG_EPS = 1e-12     # eps_g: l_k = log(Gbar_k + eps_g)
