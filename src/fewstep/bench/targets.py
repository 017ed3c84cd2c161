"""The targets every benchmark measures against: exact testbeds and bundled models with references.

A :class:`Target` is a :class:`fewstep.Model` (float64 solver states), a fixed batch of standard
normal noise and the reference end point of the probability-flow ODE from that noise:

* ``gmm2d``, ``gmm16``, ``gmm64`` (the group ``gmm``) and ``gaussian``: the exact testbeds of
  :mod:`fewstep.testbeds` under diffusers' ``linear`` beta table with an eps-predicting model, so
  diffusers' schedulers run on them natively. The reference is the testbed's own exact flow map
  (``GaussianMixture.reference``: DOP853 at rtol = atol = 1e-13 in the angle variable).
* ``digits16``, ``patches32``: bundled models from :func:`fewstep.zoo.load`; the network runs in
  float32 (float64 made it three times slower; float32 rounding is far below the errors compared),
  every solver state in float64. They have no closed form, so the reference is
  :func:`angle_reference`, a classical RK4 solve in the angle ``theta = atan2(sigma, alpha)`` with
  999 steps, checked by self-convergence (the same solve with 333 steps); the number is carried in
  :attr:`Target.reference_note`.

Example::

    >>> from fewstep.bench import targets
    >>> targets.expand("gmm,gaussian")
    ['gmm2d', 'gmm16', 'gmm64', 'gaussian']
    >>> t = targets.build("gaussian", samples=8)
    >>> tuple(t.noise.shape), t.reference.dtype
    ((8, 16), torch.float64)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch

from .. import testbeds
from ..model import Model
from ..schedules import DiscreteVP, Schedule

__all__ = [
    "Target",
    "TargetUnavailable",
    "GROUPS",
    "TESTBEDS",
    "ZOO_MODELS",
    "linear_schedule",
    "expand",
    "exact_testbed",
    "build",
    "load_zoo_model",
    "angle_reference",
    "denoise_floor",
]

F64 = torch.float64

#: Names that stand for several targets on the command line.
GROUPS = {"gmm": ("gmm2d", "gmm16", "gmm64"), "gaussian": ("gaussian",)}
#: Exact testbeds (closed-form denoiser and flow map).
TESTBEDS = ("gmm2d", "gmm16", "gmm64", "gaussian")
#: Bundled models (``fewstep.zoo``), compared against a high-accuracy float64 solve (``digits16`` is
#: the zoo's alias of ``digits16-m``; the other family members are accepted too).
ZOO_MODELS = ("digits16", "patches32", "digits16-s", "digits16-m", "digits16-l")

#: Samples per target unless ``samples=`` says otherwise: the testbeds are cheap, the networks are not.
DEFAULT_SAMPLES = {"testbed": 512, "zoo": 32}
#: RK4 steps of the reference solve for bundled models: one per timestep of a 1000-step table.
REFERENCE_STEPS = 999
#: Steps of the self-convergence check (a divisor of 999 too, so each step stays in one table piece).
CHECK_STEPS = 333


class TargetUnavailable(RuntimeError):
    """A target cannot be built here (e.g. ``fewstep.zoo`` or its weights are missing)."""


@dataclass
class Target:
    """One benchmark target: a model, fixed noise and the reference end point from that noise."""

    name: str
    model: Model
    noise: torch.Tensor
    reference: torch.Tensor
    description: str
    reference_note: str
    #: the exact testbed, when there is one (exact data samples, exact denoiser)
    exact: testbeds.GaussianMixture | None = None
    #: extra lines for the report (e.g. why a comparison is limited)
    notes: list[str] = field(default_factory=list)

    @property
    def schedule(self) -> Schedule:
        return self.model.schedule

    def rmse(self, x: torch.Tensor) -> float:
        """Root mean square distance to the reference over every sample and coordinate."""
        diff = x.to(F64).reshape(self.reference.shape) - self.reference
        return float(diff.pow(2).mean().sqrt())


def linear_schedule() -> DiscreteVP:
    """diffusers' ``linear`` beta table (DDPM): ``betas = linspace(1e-4, 0.02, 1000)``."""
    return DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))


def expand(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Turn ``"gmm,digits16"`` (or a list) into target names; unknown names raise ``ValueError``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    valid = sorted(set(GROUPS) | set(TESTBEDS) | set(ZOO_MODELS))
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name in GROUPS:
            names = GROUPS[name]
        elif name in TESTBEDS or name in ZOO_MODELS:
            names = (name,)
        else:
            raise ValueError(f"target: unknown name {name!r}; valid: {valid}")
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError(f"target: give at least one name from {valid}")
    return out


def exact_testbed(name: str) -> testbeds.GaussianMixture:
    """The exact testbed behind a target name (``gaussian``: N(0.3, 0.5^2 I) in 16-D)."""
    if name == "gaussian":
        return testbeds.Gaussian(mean=0.3, std=0.5, dim=16)
    mixtures = testbeds.mixtures()
    if name not in mixtures:
        raise ValueError(f"target: {name!r} is not a testbed; valid: {list(TESTBEDS)}")
    return mixtures[name]


def fixed_noise(n: int, shape, seed: int) -> torch.Tensor:
    """Standard normal noise that depends only on ``(n, shape, seed)``."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def build(name: str, samples: int | None = None, seed: int = 0, progress: bool = False) -> Target:
    """Build the target ``name`` (see :func:`expand`) with ``samples`` noise draws from ``seed``.

    Bundled models raise :class:`TargetUnavailable` when ``fewstep.zoo`` cannot load them.
    """
    if samples is not None and (not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples: expected a positive integer, got {samples!r}")
    if name in TESTBEDS:
        return _build_testbed(name, samples or DEFAULT_SAMPLES["testbed"], seed)
    if name in ZOO_MODELS:
        return _build_zoo(name, samples or DEFAULT_SAMPLES["zoo"], seed, progress)
    raise ValueError(f"target: unknown name {name!r}; valid: {list(TESTBEDS + ZOO_MODELS)}")


def _build_testbed(name: str, samples: int, seed: int) -> Target:
    gm = exact_testbed(name)
    sch = linear_schedule()
    model = gm.model(sch, prediction="eps", dtype=F64)
    noise = fixed_noise(samples, (gm.dim,), seed)
    reference = gm.reference(noise, sch)
    kind = "Gaussian" if isinstance(gm, testbeds.Gaussian) else f"{gm.num_components}-component mixture"
    return Target(
        name=name,
        model=model,
        noise=noise,
        reference=reference,
        description=f"{kind} in {gm.dim}-D, eps prediction, DiscreteVP linear betas (1e-4..0.02, 1000), "
        f"{samples} samples, float64",
        reference_note="exact flow map (closed form for the Gaussian; DOP853 at rtol = atol = 1e-13 for mixtures)",
        exact=gm,
    )


def denoise_floor(target: Target) -> float | None:
    """RMSE of a perfect solve to ``t_min`` followed by one denoising step, against the reference.

    Solvers that end with the data prediction at the last grid time (every DDIM-like final step)
    cannot beat this on testbeds whose reference runs on to zero noise; it is reported beside the
    tables so small errors are read correctly.
    """
    gm = target.exact
    if gm is None:
        return None
    sch = target.schedule
    at_tmin = gm.reference(target.noise, sch, t_end=sch.t_min)
    return target.rmse(gm.denoise(at_tmin, sch, sch.t_min))


# ------------------------------------------------------------------------------------- bundled models
def load_zoo_model(name: str, dtype: torch.dtype = torch.float32) -> Model:
    """``fewstep.zoo.load(name)`` with its network run in ``dtype`` on any input dtype.

    The state of every solver (and of the reference solve) stays float64; only the network call is
    cast, in and out, by a small wrapper, so fewstep's driver and diffusers' schedulers (which call
    the network directly) evaluate exactly the same function. Raises :class:`TargetUnavailable` when
    the zoo or its weights are missing.
    """
    try:
        from .. import zoo
    except ModuleNotFoundError as e:
        raise TargetUnavailable(f"{name}: fewstep.zoo is not available in this installation ({e})") from e
    load = getattr(zoo, "load", None)
    if load is None:
        raise TargetUnavailable(f"{name}: fewstep.zoo has no load() yet")
    try:
        model = load(name)
    except (FileNotFoundError, KeyError, ValueError, ModuleNotFoundError, OSError) as e:
        raise TargetUnavailable(f"{name}: fewstep.zoo.load({name!r}) failed: {e}") from e
    if not isinstance(model, Model):
        raise TargetUnavailable(f"{name}: fewstep.zoo.load returned {type(model).__name__}, not a fewstep.Model")
    model = model._copy()
    module = model.net
    if isinstance(module, torch.nn.Module):
        module = module.to(dtype).eval()

    def net(x, model_time, **cond):
        return module(x.to(dtype), model_time.to(dtype), **cond).to(x.dtype)

    model.net = net
    model.dtype = None  # the wrapper casts; the driver passes the float64 state as it is
    return model


def _build_zoo(name: str, samples: int, seed: int, progress: bool) -> Target:
    model = load_zoo_model(name)
    if model.sample_shape is None:
        raise TargetUnavailable(f"{name}: the bundled model does not declare sample_shape")
    noise = fixed_noise(samples, model.sample_shape, seed)
    notes = []
    null_label = getattr(model, "null_label", None)
    if null_label is not None:
        # class-conditional: every class in turn, no guidance (one batch per network call)
        model = model.with_cond(label=torch.arange(samples) % int(null_label))
        notes.append(f"class-conditional: labels 0..{int(null_label) - 1} in turn, no guidance")
    with torch.no_grad():
        reference = angle_reference(model, noise, REFERENCE_STEPS, progress=progress, desc=f"{name} reference")
        check = angle_reference(model, noise, CHECK_STEPS, progress=progress, desc=f"{name} check")
    diff = float((reference - check).pow(2).mean().sqrt())
    note = (
        f"RK4 in theta = atan2(sigma, alpha) with {REFERENCE_STEPS} steps uniform in t (4 evaluations "
        f"each) to t_min, then the data prediction there, float64 state; self-convergence: "
        f"RMSE({REFERENCE_STEPS} vs {CHECK_STEPS} steps) = {diff:.2e}, an upper bound on the reference's "
        "own error (the finer solve is the more accurate)"
    )
    target = Target(
        name=name,
        model=model,
        noise=noise,
        reference=reference,
        description=f"bundled model {_resolved(name, model)} ({model.prediction} prediction, {model.schedule!r}), "
        f"sample shape {tuple(model.sample_shape)}, {samples} samples, network in float32, solver states "
        "in float64",
        reference_note=note,
        notes=notes,
    )
    target.self_convergence = diff  # type: ignore[attr-defined]
    return target


def _resolved(name: str, model: Model) -> str:
    """``"digits16 (= digits16-l)"`` when the zoo resolves an alias, else the name."""
    real = getattr(model, "name", None)
    return f"{name} (= {real})" if real and real != name else name


@torch.no_grad()
def angle_reference(model: Model, noise: torch.Tensor, steps: int, *, progress: bool = False,
                    desc: str = "reference") -> torch.Tensor:
    """A high-accuracy, solver-independent float64 solve of the probability-flow ODE.

    With ``theta = atan2(sigma, alpha)`` and ``y = x / sqrt(alpha^2 + sigma^2)`` the ODE reads
    ``dy/dtheta = cos(theta) eps_hat - sin(theta) x0_hat``, smooth on the whole interval and free of
    the stiffness of the ``t`` and ``lambda`` forms. Classical RK4 in ``theta``, with step ends
    uniform in schedule time ``t``, runs from ``t_max`` to ``t_min``; the result is the data
    prediction at ``t_min`` (what every fewstep solver's final step to zero noise returns from an
    exact state there).

    Example::

        >>> import torch
        >>> from fewstep import testbeds
        >>> gm = testbeds.Gaussian(0.3, 0.5, dim=2)
        >>> sch = linear_schedule()
        >>> noise = torch.randn(4, 2, dtype=torch.float64)
        >>> ref = angle_reference(gm.model(sch), noise, 333)
        >>> exact = gm.denoise(gm.reference(noise, sch, t_end=0.0), sch, 0.0)
        >>> bool((ref - exact).abs().max() < 1e-8)
        True
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    sch = model.schedule
    x = noise.to(F64) * sch.initial_scale
    # Step ends uniform in schedule time t, the network's own clock: networks trained on a table of
    # timesteps see t through a sinusoidal embedding that oscillates over a few timesteps, and steps
    # uniform in t resolve it evenly. For a DiscreteVP with `steps` dividing N - 1, every step also
    # lies inside one linear piece of the table, so the right-hand side is smooth within each step.
    ts = torch.linspace(sch.t_max, sch.t_min, steps + 1, dtype=F64)
    ends = torch.atan2(sch.sigma(ts), sch.alpha(ts))
    # every stage angle at once: the step ends and the midpoints (in theta), as schedule times
    thetas = torch.empty(2 * steps + 1, dtype=F64)
    thetas[0::2] = ends
    thetas[1::2] = 0.5 * (ends[:-1] + ends[1:])
    times = sch.t_of_lambda(torch.log(torch.cos(thetas) / torch.sin(thetas))).clamp(sch.t_min, sch.t_max)
    times[0::2] = ts  # the ends exactly, despite rounding in the inverse
    nodes = sch.nodes(times)

    def rhs(y: torch.Tensor, k: int) -> torch.Tensor:
        node = nodes[k]
        th = float(thetas[k])
        r = math.hypot(node.alpha, node.sigma)
        xs = y * r
        x0 = model.evaluate([xs], [node], "x0")[0].to(F64)
        eps = (xs - node.alpha * x0) / node.sigma
        return math.cos(th) * eps - math.sin(th) * x0

    y = x / math.hypot(nodes[0].alpha, nodes[0].sigma)
    bar = _bar(progress, steps, desc)
    for i in range(steps):
        k = 2 * i
        h = float(ends[i + 1] - ends[i])
        k1 = rhs(y, k)
        k2 = rhs(y + 0.5 * h * k1, k + 1)
        k3 = rhs(y + 0.5 * h * k2, k + 1)
        k4 = rhs(y + h * k3, k + 2)
        y = y + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    end = nodes[-1]
    x_end = y * math.hypot(end.alpha, end.sigma)
    return model.evaluate([x_end], [end], "x0")[0].to(F64)


def _theta(sch: Schedule, t: float) -> float:
    return math.atan2(float(sch.sigma(t)), float(sch.alpha(t)))


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)

