"""docs/math.md §5's gate controller written out by hand in float64 Python, independently of
q2kernels (its constants are typed here, not imported): the oracle of the controller tests."""
import math

BETA = 0.1      # EMA weight of the new sample
ETA = 0.05      # gate-logit step
EPS_G = 1e-12   # inside the log


def controller_by_hand(energies_per_step, theta, tau=None, beta=BETA, eta=ETA):
    """[(G, Gbar, theta) after each step] for the all-reduced branch energies E of each step."""
    theta = [float(t) for t in theta]
    tau = [0.0] * len(theta) if tau is None else [float(t) for t in tau]
    gbar, out = None, []
    for E in energies_per_step:
        G = [math.sqrt(float(e)) for e in E]
        if gbar is None:  # the first step takes G as it is
            gbar = G
        else:
            gbar = [(1 - beta) * old + beta * new for old, new in zip(gbar, G)]
        logs = [math.log(gb + EPS_G) for gb in gbar]
        mean_log = sum(logs) / len(logs)
        err = [lk - mean_log - tk for lk, tk in zip(logs, tau)]
        theta = [t - eta * ek for t, ek in zip(theta, err)]
        mean_theta = sum(theta) / len(theta)
        theta = [t - mean_theta for t in theta]
        out.append((G, gbar, theta))
    return out
