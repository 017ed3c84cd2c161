"""The drop-in adapters: a diffusers scheduler and k-diffusion-style sampler functions.

Both drive the same solver generators as ``fewstep.sample``; the tests check that real diffusers
pipelines (tiny random UNets built from configs, no downloads) and k-diffusion-style calls give the
numbers ``fewstep.sample`` gives, for every registered solver.
"""
import copy
import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.schedulers.scheduling_utils import AysSchedules
from diffusers.utils.torch_utils import randn_tensor

import fewstep
from fewstep import grids, schedules, solvers, testbeds
from fewstep.integrations import FLOW_START, kdiffusion
from fewstep.integrations.diffusers import FewstepScheduler
from fewstep.schedules import ZERO_NOISE
from fewstep.solvers.base import Evaluate, Solver, StepDone, nodes_with_end

F64 = torch.float64
NFE = 6
SHAPE = (2, 3, 8, 8)
DDPM_SCHEDULE = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))  # diffusers' "linear"

# Solvers that cannot run with default options: they need a file or a model family, not a pipeline.
NEEDS_OPTIONS = {name for name, cls in solvers.REGISTRY.items() if cls.needs_inputs}


def _solvers(stochastic: bool) -> list[str]:
    names = []
    for name, cls in sorted(solvers.REGISTRY.items()):
        if name in NEEDS_OPTIONS or cls.stochastic != stochastic:
            continue
        names.append(name)
    return names


DETERMINISTIC = _solvers(False)
STOCHASTIC = _solvers(True)


def test_every_registered_solver_is_covered():
    assert "ddim" in DETERMINISTIC
    assert set(solvers.REGISTRY) == set(DETERMINISTIC) | set(STOCHASTIC) | (NEEDS_OPTIONS & set(solvers.REGISTRY))
    for name in DETERMINISTIC + STOCHASTIC:
        solvers.get(name)  # runs with its defaults


def test_import_fewstep_does_not_import_diffusers():
    code = ("import sys, fewstep, fewstep.integrations, fewstep.integrations.kdiffusion; "
            "print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------- tiny networks
@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4)
    return net.eval().requires_grad_(False)


def _net(unet):
    return lambda x, t: unet(x, t).sample


def _record_steps(scheduler):
    """Wrap ``scheduler.step`` to keep every returned ``prev_sample`` (the raw latents)."""
    seen = []
    step = scheduler.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out.prev_sample if kwargs.get("return_dict", True) else out[0])
        return out

    scheduler.step = recording
    return seen


def _relerr(a, b) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


# ------------------------------------------------------------------------------ DDPM pipeline
def _ddpm_run(unet, solver, seed=3, **config):
    pipe = DDPMPipeline(unet=unet, scheduler=FewstepScheduler(solver=solver, **config))
    pipe.set_progress_bar_config(disable=True)
    latents = _record_steps(pipe.scheduler)
    with torch.no_grad():
        images = pipe(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(seed), num_inference_steps=NFE,
                      output_type="np").images
    return pipe.scheduler, latents, images


@pytest.mark.parametrize("solver", DETERMINISTIC)
def test_ddpm_pipeline_equals_fewstep_sample(unet, solver):
    sched, latents, images = _ddpm_run(unet, solver)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))  # DDPMPipeline's draw
    model = fewstep.Model(_net(unet), DDPM_SCHEDULE, "eps")
    with torch.no_grad():
        ref, info = fewstep.sample(model, noise, solver=solver, nfe=NFE, return_info=True)
    # compared: the raw final latents the last step() returned (before the pipeline's clamp)
    assert _relerr(latents[-1], ref) <= 1e-5
    # and the pipeline's own output is exactly their image transform
    expect = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - expect).max() <= 1e-6
    # one pipeline call per listed evaluation, the budget kept (plus a discarded call for free-first solvers)
    assert len(latents) == sched.nfe == len(sched.timesteps) == info.nfe + sched.discards_first_call
    assert info.nfe <= NFE


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_ddpm_pipeline_stochastic_solvers_share_the_generator(unet, solver):
    _, latents, _ = _ddpm_run(unet, solver, seed=11)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(SHAPE, generator=g)  # DDPMPipeline draws the latents first, then step() draws
    with torch.no_grad():
        ref = fewstep.sample(fewstep.Model(_net(unet), DDPM_SCHEDULE, "eps"), noise, solver=solver, nfe=NFE, generator=g)
    assert _relerr(latents[-1], ref) <= 1e-5


# ------------------------------------------------------------------------- flow-matching pipeline
class TinyFlowPipeline(DiffusionPipeline):
    """The denoising loop of diffusers' Flux pipeline (sigmas, dynamic shift ``mu``, ``set_begin_index``,
    ``step(..., return_dict=False)`` without a generator) around a UNet that predicts the velocity.
    ``flux=False`` runs SD3's loop instead (``num_inference_steps`` only, static ``shift``)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, num_inference_steps=NFE, generator=None, flux=True):
        latents = randn_tensor(SHAPE, generator=generator, dtype=self.unet.dtype)
        config = self.scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(SHAPE[-1] * SHAPE[-2], config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.15))
        if flux:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            timesteps, _ = retrieve_timesteps(self.scheduler, None, "cpu", sigmas=sigmas, **kwargs)
        else:
            timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, "cpu", **kwargs)
        self.scheduler.set_begin_index(0)
        for t in timesteps:
            velocity = self.unet(latents, t.expand(latents.shape[0]).to(latents.dtype)).sample
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents


FLUX_CONFIG = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)


@pytest.mark.parametrize("solver", DETERMINISTIC)
def test_flow_pipeline_equals_fewstep_sample(unet, solver):
    pipe = TinyFlowPipeline(unet, FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG))
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver=solver)
    assert pipe.scheduler.config.kind == "flow" and pipe.scheduler.config.prediction_type == "flow_prediction"
    out = pipe(generator=torch.Generator().manual_seed(1))
    sched = pipe.scheduler
    # the grid is the pipeline's shifted sigmas (a solver that cannot start at pure noise starts at FLOW_START)
    assert float(sched.grid_times[0]) in (1.0, FLOW_START)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    model = fewstep.Model(_net(unet), schedules.RectifiedFlow(t_min=1e-3, t_max=1.0, time_scale=1000), "flow")
    with torch.no_grad():
        ref = fewstep.sample(model, noise, solver=solver, grid=sched.grid_times)
    assert torch.isfinite(out).all()
    assert _relerr(out, ref) <= 1e-5


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_flow_pipeline_stochastic_solvers_use_the_seed_config(unet, solver):
    pipe = TinyFlowPipeline(unet, FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG))
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver=solver, seed=7)
    out = pipe(generator=torch.Generator().manual_seed(1))  # flow pipelines pass no generator to step()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    model = fewstep.Model(_net(unet), pipe.scheduler.schedule, "flow")
    with torch.no_grad():
        ref = fewstep.sample(model, noise, solver=solver, grid=pipe.scheduler.grid_times,
                             generator=torch.Generator().manual_seed(7))
    assert _relerr(out, ref) <= 1e-5


@pytest.mark.parametrize("flux, config", [(True, FLUX_CONFIG), (False, dict(shift=3.0)), (True, dict(shift=3.0)),
                                          (False, dict(shift=3.0, shift_terminal=0.1))],
                         ids=["flux-dynamic", "sd3-static", "flux-static", "sd3-terminal"])
def test_flow_ddim_is_flow_match_euler(unet, flux, config):
    # DDIM in data view on x = (1 - s) x0 + s eps is exactly Euler on the velocity, so the adapter must
    # reproduce FlowMatchEulerDiscreteScheduler: same timesteps (shift, mu, terminal stretch) and samples.
    pipe = TinyFlowPipeline(unet, FlowMatchEulerDiscreteScheduler(**config))
    euler = pipe(generator=torch.Generator().manual_seed(2), flux=flux)
    reference = pipe.scheduler
    pipe.scheduler = FewstepScheduler.from_config(reference.config, solver="ddim")
    ours = pipe(generator=torch.Generator().manual_seed(2), flux=flux)
    assert float((pipe.scheduler.timesteps - reference.timesteps).abs().max()) <= 1e-3
    assert torch.allclose(pipe.scheduler.sigmas, reference.sigmas, atol=1e-6)
    assert _relerr(ours, euler) <= 1e-5


# -------------------------------------------------------------------- schedules from configs
@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"),
    dict(trained_betas=np.linspace(2e-4, 0.03, 1000).tolist()),
], ids=["linear", "scaled_linear", "squaredcos", "sigmoid", "trained"])
def test_vp_tables_match_diffusers(config):
    ours = FewstepScheduler.from_config(DDPMScheduler(**config).config)
    theirs = DDPMScheduler(**config).alphas_cumprod.to(F64)  # accumulated in float32 by diffusers
    assert ours.config.kind == "vp"
    assert torch.allclose(ours.schedule.alphas_cumprod, theirs, rtol=2e-5, atol=1e-7)


def test_zero_terminal_snr_keeps_a_finite_start():
    ours = FewstepScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    theirs = DDPMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012).alphas_cumprod.to(F64)
    assert torch.allclose(ours.schedule.alphas_cumprod[:-1], theirs[:-1], rtol=2e-5, atol=1e-7)
    assert float(ours.schedule.alphas_cumprod[-1]) == 2.0**-24


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("solver", ["ddim", "dpm++"] if "dpm++" in solvers.REGISTRY else ["ddim"])
def test_prediction_types_drive_the_same_solver(prediction_type, solver):
    # an exact mixture network speaking the pipeline's prediction type, in float64
    gm = testbeds.mixtures()["gmm16"]
    sched = FewstepScheduler(solver=solver, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type=prediction_type)
    model = gm.model(sched.schedule, prediction_type)
    noise = torch.randn(5, 16, dtype=F64, generator=torch.Generator().manual_seed(4))
    sched.set_timesteps(NFE)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model.net(x, t.expand(5).to(F64)), t, x).prev_sample
    ref = fewstep.sample(model, noise, solver=solver, nfe=NFE)
    # the float32 timesteps put the network at float32-rounded times: same rounding as fewstep.sample
    assert float((x - ref).abs().max()) <= 1e-6


def test_explicit_timesteps_and_ays_sigmas():
    sched = FewstepScheduler(solver="ddim", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(timesteps=AysSchedules["StableDiffusionTimesteps"])
    assert sched.timesteps.tolist() == [float(t) for t in AysSchedules["StableDiffusionTimesteps"]]
    sched.set_timesteps(sigmas=AysSchedules["StableDiffusionSigmas"])
    ays = torch.tensor(AysSchedules["StableDiffusionSigmas"][:-1], dtype=F64)
    ve = torch.tensor([n.sigma / n.alpha for n in sched.schedule.nodes(sched.grid_times)], dtype=F64)
    assert sched.nfe == 10 and float(sched.grid_times[0]) == 999.0  # 14.615 rounds sigma_max = 14.6146 up
    assert torch.allclose(ve[1:], ays[1:], rtol=1e-9)
    assert torch.allclose(sched.sigmas[:-1].to(F64), ve, rtol=1e-6) and float(sched.sigmas[-1]) == 0.0


def test_named_grid_sets_the_budget_even_when_the_pipeline_passes_sigmas():
    sched = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="ddim", grid="uniform")
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.1, 7))
    assert sched.nfe == 7
    assert torch.allclose(sched.grid_times, torch.linspace(1.0, float(sched.grid_times[-1]), 7, dtype=F64))


def test_forward_process_matches_diffusers():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 999])
    ours = FewstepScheduler().add_noise(x0, noise, t)
    assert torch.allclose(ours, DDPMScheduler().add_noise(x0, noise, t), atol=1e-5)
    flow = FewstepScheduler(kind="flow")
    sigma = torch.tensor([0.25])
    assert torch.allclose(flow.scale_noise(x0, sigma * 1000, noise), (1 - sigma) * x0 + sigma * noise, atol=1e-6)


# ------------------------------------------------------------------- config, save, compatibility
def test_kind_is_detected_from_any_config():
    assert FewstepScheduler.from_config(DDPMScheduler().config).config.kind == "vp"
    assert FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler().config).config.kind == "flow"
    dpm_flow = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    assert FewstepScheduler.from_config(dpm_flow.config).config.kind == "flow"
    saved = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config, _class_name="FlowMatchEulerDiscreteScheduler")
    assert FewstepScheduler.from_config(saved).config.shift == 3.0


def test_from_config_roundtrip_restores_the_original_scheduler():
    original = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ours = FewstepScheduler.from_config(original.config, solver="ddim")
    back = DDPMScheduler.from_config(ours.config)
    for key in ("beta_schedule", "beta_start", "beta_end", "clip_sample", "num_train_timesteps"):
        assert back.config[key] == original.config[key]
    names = {c.__name__ for c in ours.compatibles}
    assert {"DDPMScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"} <= names


def test_pipeline_save_and_load_keep_the_scheduler(unet, tmp_path):
    config = dict(solver="ddim", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, grid="karras")
    _, before, _ = _ddpm_run(unet, **config)
    pipe = DDPMPipeline(unet=unet, scheduler=FewstepScheduler(**config))
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, FewstepScheduler)
    assert {k: loaded.scheduler.config[k] for k in config} == config
    alone = FewstepScheduler.from_pretrained(tmp_path / "scheduler")
    assert alone.config.kind == "vp" and alone.config.grid == "karras"
    loaded.set_progress_bar_config(disable=True)
    after = _record_steps(loaded.scheduler)
    with torch.no_grad():
        loaded(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(3), num_inference_steps=NFE, output_type="np")
    assert torch.equal(after[-1], before[-1])


def test_flow_config_survives_save(tmp_path):
    sched = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="ddim", order=None)
    sched.save_pretrained(tmp_path)
    loaded = FewstepScheduler.from_pretrained(tmp_path)
    assert loaded.config.kind == "flow" and loaded.config.prediction_type == "flow_prediction"
    loaded.set_timesteps(4)
    sched.set_timesteps(4)
    assert torch.equal(loaded.timesteps, sched.timesteps)


# ------------------------------------------------------------------------------- step mechanics
def _zero_eps_run(sched, x, modify=None):
    sched.set_timesteps(NFE)
    for k, t in enumerate(sched.timesteps):
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
        if modify is not None and k == modify[0]:
            x = x + modify[1]
    return x


def test_instances_share_no_state_and_runs_interleave():
    config = FewstepScheduler(solver="dpm++" if "dpm++" in solvers.REGISTRY else "ddim").config
    a, b = FewstepScheduler.from_config(config), FewstepScheduler.from_config(config)
    xa, xb = torch.randn(1, 4), torch.randn(1, 4)
    alone_a, alone_b = _zero_eps_run(FewstepScheduler.from_config(config), xa), _zero_eps_run(
        FewstepScheduler.from_config(config), xb)
    a.set_timesteps(NFE)
    b.set_timesteps(NFE)
    ya, yb = xa, xb
    for t in a.timesteps:
        ya = a.step(torch.zeros_like(ya), t, ya).prev_sample
        yb = b.step(torch.zeros_like(yb), t, yb).prev_sample
    assert torch.equal(ya, alone_a) and torch.equal(yb, alone_b)
    # set_timesteps resets: the same instance gives the same result again
    assert torch.equal(_zero_eps_run(a, xa), alone_a)


def test_latents_replaced_by_the_pipeline_become_the_state():
    # With a zero noise prediction, DDIM maps x -> (alpha_next / alpha) x, so the end is x / alpha(first).
    # Adding delta to the latents after call k adds delta / alpha(node k+1) to the clean sample.
    sched = FewstepScheduler(solver="ddim")
    x = torch.randn(2, 5, dtype=F64)
    plain = _zero_eps_run(sched, x)
    alpha = [n.alpha for n in sched.schedule.nodes(sched.grid_times)]
    assert torch.allclose(plain, x / alpha[0], rtol=1e-12)
    changed = _zero_eps_run(sched, x, modify=(2, 0.5))
    assert torch.allclose(changed - plain, torch.full_like(x, 0.5 / alpha[3]), rtol=1e-9)


def test_step_arguments_and_order_of_calls():
    sched = FewstepScheduler(solver="ddim")
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="set_begin_index"):
        sched.step(x, torch.tensor(500.0), x)  # not timesteps[0], and no begin index set
    sched.set_timesteps(3)
    out = [sched.step(x, t, x, return_dict=False) for t in sched.timesteps]
    assert all(isinstance(o, tuple) and len(o) == 1 for o in out)
    with pytest.raises(ValueError, match="more than len"):
        sched.step(x, 0, x)
    assert sched.scale_model_input(x, 3) is x and sched.init_noise_sigma == 1.0 and len(sched) == 1000


def test_timestep_argument_is_not_looked_up_and_learned_variance_is_dropped():
    x = torch.randn(2, 3, 4, 4)
    plain = _zero_eps_run(FewstepScheduler(solver="ddim"), x)
    sched = FewstepScheduler(solver="ddim", variance_type="learned_range")
    sched.set_timesteps(NFE)
    y = x
    for _ in range(NFE):  # the position is a step counter: no timestep needed at all
        y = sched.step(torch.cat([torch.zeros_like(y), torch.randn_like(y)], dim=1), None, y).prev_sample
    assert torch.equal(y, plain)


def test_low_precision_latents_keep_a_float32_state():
    sched = FewstepScheduler(solver="dpm++" if "dpm++" in solvers.REGISTRY else "ddim")
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sched.schedule, "eps")
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(NFE)
    x = noise.half()
    for t in sched.timesteps:
        x = sched.step(model.net(x.float(), t.expand(4)).half(), t, x).prev_sample
        assert x.dtype == torch.float16
    ref = fewstep.sample(model, noise, solver=sched.fewstep_solver.name, nfe=NFE)
    assert float((x.float() - ref).abs().max()) <= 2e-2  # fp16 rounding of inputs and outputs only


def test_copy_mid_run_refuses_to_step_until_reset():
    sched = FewstepScheduler(solver="ddim")
    sched.set_timesteps(3)
    x = torch.randn(1, 4)
    sched.step(x, sched.timesteps[0], x)
    clone = copy.deepcopy(sched)
    with pytest.raises(RuntimeError, match="copied in the middle of a run"):
        clone.step(x, clone.timesteps[1], x)
    assert torch.equal(_zero_eps_run(clone, x), _zero_eps_run(FewstepScheduler(solver="ddim"), x))


@pytest.mark.parametrize("solver", [s for s in ("ddim", "dpm++", "unipc") if s in solvers.REGISTRY])
def test_begin_index_continues_like_the_rest_of_the_grid(solver):
    # img2img: start at timesteps[2] from add_noise(x0); equal to a run on the explicit rest of the grid
    gm = testbeds.mixtures()["gmm16"]
    sched = FewstepScheduler(solver=solver)
    model = gm.model(sched.schedule, "eps")
    x0, noise = gm.sample_data(3, torch.Generator().manual_seed(0)), torch.randn(3, 16, dtype=F64)

    def run(s, begin):
        x = s.add_noise(x0, noise, s.timesteps[begin:begin + 1])
        for t in s.timesteps[begin:]:
            x = s.step(model.net(x, t.expand(3).to(F64)), t, x).prev_sample
        return x

    sched.set_timesteps(NFE)
    rest = sched.grid_times[2:]  # float64 grid times (DiscreteVP's are its timesteps)
    sched.set_begin_index(2)
    partial = run(sched, 2)
    explicit = FewstepScheduler(solver=solver)
    explicit.set_timesteps(timesteps=rest)
    assert float((partial - run(explicit, 0)).abs().max()) <= 1e-12


def test_begin_index_inside_a_multi_evaluation_step_is_refused():
    sched = FewstepScheduler(solver="heun")
    sched.set_timesteps(5)  # 3 grid points: evaluations at t0, t1 (predictor), t1 (corrected), t2, t2
    with pytest.raises(ValueError, match="cannot start at timesteps\\[1\\]"):
        sched.set_begin_index(1)  # the predictor's evaluation: its state is not a solution yet
    sched.set_begin_index(2)  # the corrected state at t1 is: the rest of the run is Heun from t1


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(solver="nope"), ValueError, "unknown name 'nope'"),
    (dict(solver="ddim", order=2), ValueError, "unknown option"),
    (dict(grid="cosine"), ValueError, "grid: unknown name"),
    (dict(kind="ve"), ValueError, "kind: unknown"),
    (dict(beta_schedule="exp"), ValueError, "beta_schedule: unknown"),
    (dict(use_beta_sigmas=True), ValueError, "use_beta_sigmas"),
    (dict(invert_sigmas=True, kind="flow"), ValueError, "invert_sigmas"),
    (dict(seed="7"), TypeError, "seed"),
])
def test_bad_configs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FewstepScheduler(**kwargs)


def test_bad_set_timesteps():
    sched = FewstepScheduler(solver="ddim")
    with pytest.raises(ValueError, match="num_inference_steps: required"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="at most one"):
        sched.set_timesteps(timesteps=[999, 500], sigmas=[14.6, 1.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sched.set_timesteps(timesteps=[500, 999])
    with pytest.raises(ValueError, match="mu: only flow"):
        sched.set_timesteps(4, mu=0.5)
    flux = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config, solver="ddim")
    with pytest.raises(ValueError, match="mu: required"):
        flux.set_timesteps(4)


# ------------------------------------------------------------------ batched requests (a toy solver)
@dataclass
class _PairPlan:
    nodes: list
    view: str = "x0"


class _PairSolver(Solver):
    """A toy solver whose requests batch two nodes (like a Jacobi sweep): DDIM from t_i evaluated
    together with a DDIM look-ahead state at t_{i+1}, then averages the two data predictions."""

    name = "pair-toy"

    def prepare(self, schedule, times):
        return _PairPlan(nodes_with_end(schedule, times))

    def run(self, plan, x, noise):
        nodes = plan.nodes
        for i in range(len(nodes) - 1):
            s, t = nodes[i], nodes[i + 1]
            r = t.sigma / s.sigma
            ahead = x * 0.5  # an arbitrary second state: the test only needs two distinct xs
            d_here, d_ahead = yield Evaluate((x, ahead), (s, t if t is not ZERO_NOISE else s), i)
            x = x * r + (0.5 * (d_here + d_ahead)) * (t.alpha - s.alpha * r)
            yield StepDone(i, t.t, x)
        return x


def test_batched_requests_are_served_one_node_per_call(monkeypatch):
    monkeypatch.setitem(solvers.REGISTRY, "pair-toy", _PairSolver)
    gm = testbeds.mixtures()["gmm16"]
    sched = FewstepScheduler(solver="pair-toy")
    model = gm.model(sched.schedule, "eps")
    noise = torch.randn(3, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(4)
    assert sched.nfe == 8  # two nodes per step, one pipeline call each
    x = noise
    for t in sched.timesteps:
        x = sched.step(model.net(x, t.expand(3).to(F64)), t, x).prev_sample
    ref = fewstep.sample(model, noise, solver="pair-toy", grid=sched.grid_times)
    assert float((x - ref).abs().max()) <= 1e-6  # float32 timesteps vs float64 model time
    # and the k-diffusion functions pick up solvers registered later
    assert kdiffusion.sample_pair_toy.__name__ == "sample_pair_toy"


# ------------------------------------------------------------------------------ k-diffusion
EDM_GRID = grids.make("karras", schedules.EDM(), 8)
EDM_SIGMAS = torch.cat([EDM_GRID, torch.zeros(1, dtype=F64)])


@pytest.fixture(scope="module")
def edm_case():
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(schedules.EDM(), "x0")
    noise = torch.randn(6, 16, dtype=F64, generator=torch.Generator().manual_seed(0))
    return model, noise


@pytest.mark.parametrize("solver", DETERMINISTIC)
def test_kdiffusion_functions_equal_fewstep_sample(edm_case, solver):
    model, noise = edm_case
    fn = getattr(kdiffusion, kdiffusion.function_name(solver))
    ours = fn(model.net, noise * EDM_SIGMAS[0], EDM_SIGMAS, disable=True)
    ref = fewstep.sample(model, noise, solver=solver, grid=EDM_GRID)
    assert float((ours - ref).abs().max()) <= 1e-6


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_kdiffusion_stochastic_functions_take_a_generator_or_seed(edm_case, solver):
    model, noise = edm_case
    fn = getattr(kdiffusion, kdiffusion.function_name(solver))
    ref = fewstep.sample(model, noise, solver=solver, grid=EDM_GRID, generator=torch.Generator().manual_seed(5))
    ours = fn(model.net, noise * 80.0, EDM_SIGMAS, disable=True, generator=torch.Generator().manual_seed(5))
    assert float((ours - ref).abs().max()) <= 1e-6
    seeded = fn(lambda x, sigma, seed: model.net(x, sigma), noise * 80.0, EDM_SIGMAS, extra_args={"seed": 5},
                disable=True)
    assert float((seeded - ref).abs().max()) <= 1e-6


def _kd_euler(model, x, sigmas):
    """k-diffusion's sample_euler (no churn), written out."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        d = (x - model(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))) / s[i]
        x = x + d * (s[i + 1] - s[i])
    return x


def _kd_heun(model, x, sigmas):
    """k-diffusion's sample_heun (no churn): Euler on the last step into sigma = 0."""
    s = sigmas.tolist()
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    for i in range(len(s) - 1):
        d = (x - model(x, s[i] * ones)) / s[i]
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            x2 = x + d * (s[i + 1] - s[i])
            d2 = (x2 - model(x2, s[i + 1] * ones)) / s[i + 1]
            x = x + (d + d2) / 2 * (s[i + 1] - s[i])
    return x


def _kd_dpmpp_2m(model, x, sigmas):
    """k-diffusion's sample_dpmpp_2m: multistep in t = -log(sigma), first order at both ends."""
    s = sigmas.tolist()
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    old = None
    for i in range(len(s) - 1):
        denoised = model(x, s[i] * ones)
        h = (math.inf if s[i + 1] == 0 else -math.log(s[i + 1])) + math.log(s[i])
        if old is None or s[i + 1] == 0:
            d = denoised
        else:
            r = (math.log(s[i - 1]) - math.log(s[i])) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old = denoised
    return x


@pytest.mark.parametrize("name, reference", [("sample_euler", _kd_euler), ("sample_heun", _kd_heun),
                                             ("sample_dpmpp_2m", _kd_dpmpp_2m)])
def test_kdiffusion_names_are_kdiffusions_algorithms(edm_case, name, reference):
    model, noise = edm_case
    x = noise * 80.0
    ours = getattr(kdiffusion, name)(model.net, x, EDM_SIGMAS, disable=True)
    assert float((ours - reference(model.net, x, EDM_SIGMAS)).abs().max()) <= 1e-10


def test_kdiffusion_callback_extra_args_and_progress(edm_case, capsys):
    model, noise = edm_case
    calls = []
    seen_kwargs = []

    def denoiser(x, sigma, label):
        seen_kwargs.append(label)
        return model.net(x, sigma)

    kdiffusion.sample_ddim(denoiser, noise * 80.0, EDM_SIGMAS, extra_args={"label": 3}, callback=calls.append,
                           disable=True)
    assert seen_kwargs == [3] * 8
    assert [c["i"] for c in calls] == list(range(8))
    for c in calls:
        assert float(c["sigma"]) == float(EDM_SIGMAS[c["i"]]) == float(c["sigma_hat"])
        sigma = torch.full((6,), float(c["sigma"]), dtype=F64)
        assert torch.allclose(c["denoised"], model.net(c["x"], sigma), atol=1e-12)
    assert capsys.readouterr().err == ""
    kdiffusion.sample_ddim(model.net, noise * 80.0, EDM_SIGMAS, disable=False)
    assert "8/8" in capsys.readouterr().err


def test_kdiffusion_split_sigmas_continue_exactly(edm_case):
    # ComfyUI's SplitSigmas: a run that ends above zero returns the state there; DDIM's is exact.
    model, noise = edm_case
    x = noise * 80.0
    whole = kdiffusion.sample_ddim(model.net, x, EDM_SIGMAS, disable=True)
    first = kdiffusion.sample_ddim(model.net, x, EDM_SIGMAS[:5], disable=True)
    second = kdiffusion.sample_ddim(model.net, first, EDM_SIGMAS[4:], disable=True)
    assert float((second - whole).abs().max()) <= 1e-12


def test_kdiffusion_flow_models():
    gm = testbeds.mixtures()["gmm16"]
    flow = schedules.RectifiedFlow(t_min=1e-3, t_max=1.0)
    model = gm.model(flow, "x0")
    noise = torch.randn(4, 16, dtype=F64, generator=torch.Generator().manual_seed(2))
    grid = grids.make("uniform", flow, 7)
    sigmas = torch.cat([grid, torch.zeros(1, dtype=F64)])
    solver = "dpm++" if "dpm++" in solvers.REGISTRY else "ddim"
    ref = fewstep.sample(model, noise, solver=solver, grid=grid)
    fn = getattr(kdiffusion, kdiffusion.function_name(solver))
    explicit = fn(model.net, noise, sigmas, flow=True, disable=True)
    assert float((explicit - ref).abs().max()) <= 1e-12

    class CONST:  # ComfyUI's flow model sampling, as its samplers find it
        pass

    class Patcher:
        def get_model_object(self, name):
            return CONST() if name == "model_sampling" else None

    class Wrapped:
        inner_model = type("Inner", (), {"model_patcher": Patcher()})()

        def __call__(self, x, sigma):
            return model.net(x, sigma)

    detected = fn(Wrapped(), noise, sigmas, disable=True)
    assert torch.equal(detected, explicit)
    if solver != "ddim":  # DDIM is the same map in both coordinates; DPM-Solver++ is not (log-SNR steps)
        assert float((fn(model.net, noise, sigmas, disable=True) - ref).abs().max()) > 1e-3


def test_kdiffusion_names_and_errors(edm_case):
    model, noise = edm_case
    assert "sample_dpmpp_2m" in kdiffusion.available() or "dpm++" not in solvers.REGISTRY
    assert {kdiffusion.function_name(n) for n in solvers.available()} <= set(kdiffusion.available())
    assert kdiffusion.function_name("dpm++") == "sample_dpmpp"
    with pytest.raises(AttributeError, match="no solver for 'sample_nope'"):
        kdiffusion.sample_nope
    with pytest.raises(ValueError, match="strictly decreasing"):
        kdiffusion.sample_ddim(model.net, noise, torch.tensor([1.0, 2.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="sigmas: expected a 1-D tensor"):
        kdiffusion.sample_ddim(model.net, noise, torch.tensor([1.0]), disable=True)
    with pytest.raises(ValueError, match="unknown option"):
        kdiffusion.sample_ddim(model.net, noise, EDM_SIGMAS, disable=True, s_churn=1.0)
