"""model/conditioning.py, model/denoiser.py, model/diffusion.py: shapes, guidance, null context,
neighbour masking, deterministic sampling, image editing."""
import numpy as np
import pytest
import torch

from model.conditioning import CONDITIONINGS
from model.denoiser import KnnDenoiser, ModelConfig, block_types
from model.diffusion import guided_output, make_scheduler, sample, training_example


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared cores


def make_model(config=None, seed=0):
    torch.manual_seed(seed)
    return KnnDenoiser(config or ModelConfig.tiny()).eval()


def random_emb(config, batch=2, seed=1, slots=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, slots or config.k + 1, config.clip_dim, generator=generator)


def forward(model, emb, drop=None, neighbour_mask=None, seed=2):
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(emb.shape[0], 3, config.resolution, config.resolution, generator=generator)
    t = torch.tensor([10, 500] * (emb.shape[0] // 2))
    with torch.no_grad():
        return model(x, t, emb, drop, neighbour_mask)


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_forward_keeps_the_input_shape(preset):
    config = getattr(ModelConfig, preset)()
    model = make_model(config)
    out = forward(model, random_emb(config))
    assert out.shape == (2, 3, config.resolution, config.resolution)
    assert torch.isfinite(out).all()


def test_demo_and_paper_presets():
    assert 1.5e6 < make_model(ModelConfig.demo()).num_parameters() < 2.5e6
    assert ModelConfig.demo().k + 1 == 11
    down, up = block_types(ModelConfig.paper())  # 64 px: levels 64, 32, 16, 8
    assert down == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    assert up == ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)


def test_config_round_trip_and_errors():
    config = ModelConfig.tiny(prediction_type="v_prediction")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({**config.to_dict(), "chanels": 3})
    with pytest.raises(ValueError, match="attention_resolutions"):
        ModelConfig.tiny(attention_resolutions=(4,))
    with pytest.raises(ValueError, match="prediction_type"):
        ModelConfig.tiny(prediction_type="x0")


def test_embedding_dimension_mismatch_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="embedding dimension 7 differs"):
        forward(model, torch.zeros(2, 4, 7))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_null_context_ignores_the_embeddings(conditioning):
    model = make_model(ModelConfig.tiny(conditioning=conditioning))
    emb_a, emb_b = random_emb(model.config, seed=1), random_emb(model.config, seed=3)
    dropped = torch.ones(2, dtype=torch.bool)
    assert torch.equal(forward(model, emb_a, dropped), forward(model, emb_b, dropped))
    assert not torch.allclose(forward(model, emb_a), forward(model, emb_b))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_masked_or_missing_neighbours_carry_no_information(conditioning):
    model = make_model(ModelConfig.tiny(conditioning=conditioning))
    emb_a = random_emb(model.config, seed=1)
    emb_b = emb_a.clone()
    emb_b[:, 1:] = random_emb(model.config, seed=3)[:, 1:]  # same query, other neighbours
    only_query = torch.zeros(2, model.config.k + 1, dtype=torch.bool)
    out_a = forward(model, emb_a, neighbour_mask=only_query)
    torch.testing.assert_close(out_a, forward(model, emb_b, neighbour_mask=only_query))
    torch.testing.assert_close(out_a, forward(model, emb_a[:, :1]))  # no-kNN: query slot only
    assert not torch.allclose(forward(model, emb_a), forward(model, emb_b))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_k_zero_model(conditioning):
    config = ModelConfig.tiny(k=0, conditioning=conditioning)
    model = make_model(config)
    out = forward(model, random_emb(config))
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(out, forward(model, random_emb(config, seed=5)))  # the query conditions


@pytest.mark.parametrize("conditioning, tokens", [("self_attention", 4), ("cross_attention", 1), ("concat", 1)])
def test_conditioning_variants_give_their_context_and_use_every_neighbour(conditioning, tokens):
    """The paper's three ways to feed the neighbours: k + 1 tokens, or one; each neighbour slot counts."""
    config = ModelConfig.tiny(conditioning=conditioning)
    model = make_model(config)
    emb = random_emb(config)
    context, key_mask = model.condition(emb)
    assert context.shape == (2, tokens, config.cond_width) and key_mask is None
    for slot in range(config.k + 1):
        changed = emb.clone()
        changed[:, slot] = random_emb(config, seed=7)[:, slot]
        assert not torch.allclose(model.condition(changed)[0], context), slot
    with pytest.raises(ValueError, match="conditioning='film': use one of"):
        ModelConfig.tiny(conditioning="film")


class StubModel(torch.nn.Module):
    """Known outputs: cond = x + 1 + t/1000, uncond = 2x - 3 (selected by the drop mask)."""

    def forward(self, x, t, emb, drop_mask=None, neighbour_mask=None):
        cond = x + 1 + t.view(-1, 1, 1, 1) / 1000
        if drop_mask is None:
            return cond
        return torch.where(drop_mask.view(-1, 1, 1, 1), 2 * x - 3, cond)


def test_guidance_formula_with_a_stub():
    x = torch.randn(3, 3, 4, 4)
    cond, uncond = x + 1 + 0.25, 2 * x - 3
    for guidance in (0.0, 1.0, 8.0):
        out = guided_output(StubModel(), x, torch.tensor(250), torch.zeros(3, 2, 5), guidance)
        torch.testing.assert_close(out, uncond + guidance * (cond - uncond))


def test_guidance_batches_cond_and_uncond_like_separate_calls():
    model = make_model()
    emb = random_emb(model.config)
    x = torch.randn(2, 3, 16, 16)
    t = torch.full((2,), 300)
    with torch.no_grad():
        cond = model(x, t, emb)
        uncond = model(x, t, emb, torch.ones(2, dtype=torch.bool))
        out = guided_output(model, x, torch.tensor(300), emb, 8.0)
    torch.testing.assert_close(out, uncond + 8.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


class SlotCountingStub(torch.nn.Module):
    """cond = x + (slots present), uncond = 2x - 3: each pass of two-scale guidance is known."""

    def forward(self, x, t, emb, drop_mask=None, neighbour_mask=None):
        present = torch.full((x.shape[0],), float(emb.shape[1])) if neighbour_mask is None else neighbour_mask.sum(1).float()
        cond = x + present.view(-1, 1, 1, 1)
        return torch.where(drop_mask.view(-1, 1, 1, 1), 2 * x - 3, cond)


def test_neighbour_guidance_formula_with_a_stub():
    """out = uncond + g (query - uncond) + g_n (cond - query), the query pass with every neighbour masked;
    a masked neighbour slot stays masked in the full condition."""
    x = torch.randn(2, 3, 4, 4)
    uncond, query = 2 * x - 3, x + 1
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    cond = x + mask.sum(1).float().view(-1, 1, 1, 1)
    for guidance, neighbour_guidance in ((3.0, 6.0), (1.0, 0.0), (0.0, 2.5)):
        out = guided_output(SlotCountingStub(), x, torch.tensor(250), torch.zeros(2, 4, 5), guidance, mask,
                            neighbour_guidance=neighbour_guidance)
        torch.testing.assert_close(out, uncond + guidance * (query - uncond) + neighbour_guidance * (cond - query))


def test_neighbour_guidance_query_pass_is_the_text_alone_and_equal_scales_change_nothing():
    """With the real denoiser: g_n = 0 leaves the query's guidance alone, which is what the text alone
    (emb[:, :1], --no-knn) gives; g_n = g is ordinary guidance, bit for bit; g_n > g moves further from it."""
    model = make_model()
    emb = random_emb(model.config)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(300)
    with torch.no_grad():
        plain = guided_output(model, x, t, emb, 3.0)
        text_alone = guided_output(model, x, t, emb[:, :1], 3.0)
        torch.testing.assert_close(guided_output(model, x, t, emb, 3.0, neighbour_guidance=0.0), text_alone,
                                   rtol=1e-4, atol=1e-4)
        assert torch.equal(guided_output(model, x, t, emb, 3.0, neighbour_guidance=3.0), plain)
        further = guided_output(model, x, t, emb, 3.0, neighbour_guidance=6.0)
    torch.testing.assert_close(further, plain + (plain - text_alone), rtol=1e-3, atol=1e-3)  # 6 (c - q) = 2 * 3 (c - q)
    no_query = torch.tensor([[False] + [True] * model.config.k] * 2)
    with pytest.raises(ValueError, match="a row without its query slot"):
        guided_output(model, x, t, emb, 3.0, no_query, neighbour_guidance=6.0)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "sde-dpmsolver++"])
def test_sampling_is_deterministic_per_seed(scheduler):
    model = make_model()
    emb = random_emb(model.config)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample(model, emb, steps=4, guidance=3.0, generator=generator, scheduler=scheduler)

    first = run(0)
    assert first.dtype == np.uint8 and first.shape == (2, 16, 16, 3)
    assert np.array_equal(first, run(0))
    assert not np.array_equal(first, run(1))


class ZeroNoise(torch.nn.Module):
    """Predicts zero noise everywhere: its x_0 estimate x_t / sqrt(alpha_bar) is huge at high noise."""

    def __init__(self):
        super().__init__()
        self.config, self.weight = ModelConfig.tiny(), torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, emb, drop=None, mask=None):
        return torch.zeros_like(x) + 0 * self.weight


def test_dpm_solver_clips_its_x0_estimate_as_the_other_samplers_do(monkeypatch):
    """Without thresholding at 1.0, DPM-Solver++ carries the blown-up x_0 to the end: every pixel saturates
    (what made it draw noise on the demo model); with it, like ddpm's clip_sample, most pixels do not."""
    from diffusers import DPMSolverMultistepScheduler

    import model.diffusion as diffusion

    model = ZeroNoise()
    emb = torch.zeros(2, model.config.k + 1, model.config.clip_dim)

    def saturated(scheduler: str) -> float:
        images = sample(model, emb, steps=10, guidance=1.0, generator=torch.Generator().manual_seed(0), scheduler=scheduler)
        return float(np.isin(images, [0, 255]).mean())

    assert saturated("sde-dpmsolver++") < 0.6
    assert saturated("ddpm") < 0.6
    config = model.config
    unclipped = DPMSolverMultistepScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                            prediction_type=config.prediction_type, algorithm_type="sde-dpmsolver++")
    monkeypatch.setattr(diffusion, "make_scheduler", lambda *args: unclipped)
    assert saturated("sde-dpmsolver++") == 1.0


@pytest.mark.parametrize("scheduler", ["ddim", "sde-dpmsolver++"])
def test_init_image_with_small_strength_returns_about_the_init_image(scheduler):
    model = make_model()
    emb = random_emb(model.config)
    init = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    generator = torch.Generator().manual_seed(0)
    assert np.array_equal(sample(model, emb, steps=50, init_image=init, strength=0.0, scheduler=scheduler), init)
    edited = sample(model, emb, steps=50, guidance=1.0, init_image=init, strength=0.02,
                    generator=generator, scheduler=scheduler)
    assert np.abs(edited.astype(int) - init).mean() < 6
    fresh = sample(model, emb, steps=50, guidance=1.0, init_image=init, strength=1.0,
                   generator=generator, scheduler=scheduler)
    assert np.abs(fresh.astype(int) - init).mean() > 30


def test_training_targets():
    for prediction_type in ("epsilon", "v_prediction"):
        config = ModelConfig.tiny(prediction_type=prediction_type)
        scheduler = make_scheduler(config)
        x0, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16)
        t = torch.tensor([0, 999])
        x_t, target = training_example(scheduler, x0, noise, t)
        alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
        expected = noise if prediction_type == "epsilon" else (
            alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0)
        torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "sde-dpmsolver++"])
def test_batched_sampling_with_per_image_generators_equals_one_at_a_time(scheduler):
    """Also for the stochastic samplers, whose every step draws fresh noise from each image's own generator."""
    import torch

    from model.denoiser import KnnDenoiser, ModelConfig
    from model.diffusion import sample

    torch.manual_seed(0)
    model = KnnDenoiser(ModelConfig.tiny()).eval()
    emb = torch.randn(1, model.config.k + 1, model.config.clip_dim)
    one = [sample(model, emb, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(s), scheduler=scheduler)[0]
           for s in (7, 8)]
    both = sample(model, emb.expand(2, -1, -1), steps=4, guidance=3.0, scheduler=scheduler,
                  generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    assert not np.array_equal(both[0], both[1])
    for a, b in zip(one, both):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batch numerics may round one step apart


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_a_masked_query_slot_carries_no_information(conditioning):
    """Query dropout: with slot 0 masked the output depends on the neighbours alone."""
    model = make_model(ModelConfig.tiny(conditioning=conditioning))
    emb_a = random_emb(model.config, seed=1)
    emb_b = emb_a.clone()
    emb_b[:, 0] = random_emb(model.config, seed=3)[:, 0]  # other query, same neighbours
    no_query = torch.ones(2, model.config.k + 1, dtype=torch.bool)
    no_query[:, 0] = False
    out_a = forward(model, emb_a, neighbour_mask=no_query)
    torch.testing.assert_close(out_a, forward(model, emb_b, neighbour_mask=no_query))
    assert not torch.allclose(out_a, forward(model, emb_a))  # the query matters when present
    emb_c = emb_a.clone()
    emb_c[:, 1:] = random_emb(model.config, seed=4)[:, 1:]  # same query, other neighbours
    assert not torch.allclose(out_a, forward(model, emb_c, neighbour_mask=no_query))


def test_bf16_autocast_only_where_the_gpu_computes_bf16(monkeypatch):
    """Compute capability 8.0+ trains and samples under bf16 autocast; older GPUs (V100 7.0, T4 7.5),
    which pass torch's bf16 check by emulation, and the CPU run in fp32."""
    from model.precision import autocast, uses_bf16

    capability = {"value": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not uses_bf16(cuda) and not uses_bf16(cpu)
    capability["value"] = (8, 0)
    assert uses_bf16(cuda) and not uses_bf16(cpu)
    with autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
