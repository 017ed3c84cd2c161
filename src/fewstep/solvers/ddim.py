"""DDIM (Song, Meng, Ermon 2021): the first-order exponential integrator; ``euler`` is its alias.

In data view, step ``s -> t`` freezes the data prediction at the left end (DPM-Solver++ form, eq. (9)
of Lu et al. 2022 with k = 1)::

    x_t = (sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) x0(x_s, s)

which is exactly Euler's method on the probability-flow ODE in the variables ``x / alpha`` and
``sigma / alpha`` (k-diffusion's ``sample_euler``).
"""
from __future__ import annotations

from .base import MultistepPlan, Solver, Step, nodes_with_end, register


def ddim_step(s, t) -> Step:
    """The DDIM update between nodes ``s`` and ``t`` as a data-view :class:`Step`."""
    r = t.sigma / s.sigma
    return Step(a=r, d=(t.alpha - s.alpha * r,))


@register
class DDIM(Solver):
    name = "ddim"
    aliases = ("euler",)
    summary = "first-order exponential integrator (= Euler in sigma/alpha)"
    paper = "Song, Meng & Ermon, Denoising Diffusion Implicit Models, ICLR 2021"
    orders = (1,)
    options = {}

    def prepare(self, schedule, times):
        nodes = nodes_with_end(schedule, times)
        steps = [ddim_step(nodes[i], nodes[i + 1]) for i in range(len(nodes) - 1)]
        return MultistepPlan(view="x0", nodes=nodes[:-1], predictors=steps, history=1)
