"""model/vq*.py, model/discrete*.py: the VQ round trip and its exact resume, the mask-and-replace
tables, the batched posterior against diffusers', the loss, guidance on logits, the transformer,
the discrete trainer's exact resume, sampling determinism and the paper-size parameter count."""
import json
import os

import numpy as np
import pytest
import torch

from model.checkpoint import latest_checkpoint, load_model
from model.data import write_pack_shard
from model.discrete import DiscreteConfig, DiscreteDenoiser, count_parameters
from model.discrete_diffusion import (make_scheduler, q_posterior, q_sample, respaced_scheduler,
                                      transition_matrix, vq_diffusion_loss)
from model.discrete_sampling import guide_logits, sample_discrete
from model.discrete_trainer import train_discrete
from model.trainer import TrainParams
from model.vq import VQConfig, build_vq, codebook_usage, decode_tokens, encode_tokens, psnr
from model.vq_train import VQParams, load_vq, quality, reconstruct, tokenize, train_vq
from test_trainer import make_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = DiscreteConfig.tiny()


def test_vq_round_trip_shapes_and_determinism():
    torch.manual_seed(0)
    config = VQConfig.from_dict(TINY.vq)
    vq = build_vq(config).eval()
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        tokens = encode_tokens(vq, images)
        assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.int64
        assert int(tokens.min()) >= 0 and int(tokens.max()) < config.codes
        assert torch.equal(tokens, encode_tokens(vq, images))
        decoded = decode_tokens(vq, tokens)
        assert decoded.shape == (3, 3, 8, 8)
        assert torch.equal(decoded, decode_tokens(vq, tokens))
        # decoding tokens = VQModel's own quantise-then-decode path
        assert torch.allclose(decoded, vq.decode(vq.encode(images).latents).sample, atol=1e-6)


def test_codebook_usage_and_psnr_against_hand_values():
    usage = codebook_usage(torch.tensor([0, 0, 1, 1]), codes=4)
    assert usage == {"perplexity": 2.0, "used": 2, "dead": 2}
    assert codebook_usage(torch.tensor([3, 3, 3]), codes=4)["perplexity"] == 1.0
    a = torch.zeros(1, 3, 2, 2)
    assert psnr(a, a + 0.2) == pytest.approx(10 * np.log10(4 / 0.04), abs=1e-4)


def test_vq_training_resumes_exactly_and_tokenizes(tmp_path):
    images = np.stack([s["image"] for s in make_samples(12, resolution=8)])
    config = VQConfig.from_dict(TINY.vq)
    params = VQParams(steps=6, batch_size=4, checkpoint_every=2, log_every=1)
    train_vq(params, config, images, tmp_path / "straight")
    train_vq(VQParams(**{**params.__dict__, "stop_at_step": 3}), config, images, tmp_path / "cut")
    (tmp_path / "cut" / "checkpoints" / "step_0000003.pt").unlink()  # killed before that checkpoint
    train_vq(params, config, images, tmp_path / "cut")
    a, b = (torch.load(latest_checkpoint(d / "checkpoints"), weights_only=True) for d in (tmp_path / "straight", tmp_path / "cut"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    lines = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, 7))
    vq, _ = load_vq(latest_checkpoint(tmp_path / "cut" / "checkpoints"))
    tokens = tokenize(vq, images, batch_size=5)
    assert tokens.shape == (12, 4, 4) and tokens.dtype == np.int16
    with torch.no_grad():  # the oracle: each latent's nearest codebook vector, by brute force
        latents = vq.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latents
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    nearest = torch.cdist(flat, vq.quantize.embedding.weight).argmin(dim=1).reshape(12, 4, 4)
    np.testing.assert_array_equal(tokens, nearest.numpy())
    recon = reconstruct(vq, tokens)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    report = quality(images, tokens, recon, config.codes)
    assert report["used"] == len(np.unique(tokens)) and report["used"] + report["dead"] == config.codes
    assert report["psnr"] > 0


@pytest.mark.parametrize("t", [0, 4, 9])
def test_transition_matrices_are_stochastic_and_compose(t):
    sched = make_scheduler(TINY.codes, TINY.num_train_timesteps)
    step, cumulative = transition_matrix(sched, t, False), transition_matrix(sched, t, True)
    for Q in (step, cumulative):
        assert torch.allclose(Q.sum(dim=1), torch.ones(TINY.codes + 1, dtype=torch.float64), atol=1e-6)
        assert bool((Q >= 0).all())
    product = torch.eye(TINY.codes + 1, dtype=torch.float64)
    for s in range(t + 1):  # x_t is x_0 after t + 1 single steps
        product = product @ transition_matrix(sched, s, False)
    assert torch.allclose(product, cumulative, atol=1e-5)


def test_q_sample_matches_the_cumulative_row():
    sched = make_scheduler(TINY.codes, TINY.num_train_timesteps)
    n, t = 200_000, 5
    x0 = torch.full((1, n), 3)
    g = torch.Generator().manual_seed(0)
    x_t = q_sample(sched, x0, torch.tensor([t]), torch.rand(1, n, generator=g), torch.rand(1, n, generator=g))
    frequencies = torch.bincount(x_t[0], minlength=TINY.codes + 1).double() / n
    assert torch.allclose(frequencies, transition_matrix(sched, t, True)[3], atol=4e-3)


def test_batched_posterior_equals_diffusers_per_timestep():
    sched = make_scheduler(TINY.codes, TINY.num_train_timesteps)
    g = torch.Generator().manual_seed(1)
    log_x0 = torch.log_softmax(torch.randn(4, TINY.codes, 16, generator=g), dim=1)
    x_t = torch.randint(0, TINY.codes + 1, (4, 16), generator=g)
    t = torch.tensor([1, 2, 5, 9])
    ours = q_posterior(sched, log_x0, x_t, t)
    for i in range(4):
        theirs = sched.q_posterior(log_x0[i:i + 1], x_t[i:i + 1], int(t[i]))
        theirs = (theirs - torch.logsumexp(theirs, dim=1, keepdim=True)).clamp(min=-70)
        assert torch.allclose(ours[i:i + 1], theirs, atol=1e-5)


def test_loss_terms_against_the_definitions():
    sched = make_scheduler(TINY.codes, TINY.num_train_timesteps)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, TINY.codes, (2, 16), generator=g)
    x_t = q_sample(sched, x0, torch.tensor([0, 6]), torch.rand(2, 16, generator=g), torch.rand(2, 16, generator=g))
    log_model = torch.log_softmax(torch.randn(2, TINY.codes, 16, generator=g), dim=1)
    loss, parts = vq_diffusion_loss(sched, log_model, x0, x_t, torch.tensor([0, 6]), aux_weight=0.5)
    nll = -log_model.gather(1, x0[:, None])[:, 0]
    true = q_posterior(sched, torch.log(torch.nn.functional.one_hot(x0[1:], TINY.codes).permute(0, 2, 1).float().clamp(min=1e-30)),
                       x_t[1:], torch.tensor([6]))
    kl = (true.exp() * (true - q_posterior(sched, log_model[1:], x_t[1:], torch.tensor([6])))).sum(1)
    vlb = (nll[0].sum() + kl.sum()) / 32
    assert parts["vlb"] == pytest.approx(float(vlb), rel=1e-5)
    assert float(loss) == pytest.approx(float(vlb + 0.5 * nll.mean()), rel=1e-5)
    # a perfect model has no loss left
    perfect = torch.log(torch.nn.functional.one_hot(x0, TINY.codes).permute(0, 2, 1).float().clamp(min=1e-30))
    assert vq_diffusion_loss(sched, perfect, x0, x_t, torch.tensor([3, 6]), 1.0)[0] < 1e-4


def test_guidance_on_logits_is_the_formula():
    g = torch.Generator().manual_seed(3)
    cond, uncond = (torch.log_softmax(torch.randn(2, 5, 7, generator=g), dim=1) for _ in range(2))
    guided = guide_logits(cond, uncond, 3.0)
    expected = torch.log_softmax(uncond + 3.0 * (cond - uncond), dim=1)
    assert torch.allclose(guided, expected, atol=1e-6)
    # on raw logits (any per-token offset) the result is the same distribution
    offset = torch.randn(2, 1, 7, generator=g)
    assert torch.allclose(guide_logits(cond + offset, uncond - offset, 3.0), guided, atol=1e-5)
    assert torch.allclose(guide_logits(cond, uncond, 1.0), cond, atol=1e-6)
    query = torch.log_softmax(torch.randn(2, 5, 7, generator=g), dim=1)  # two-scale: the neighbours apart
    expected = torch.log_softmax(uncond + 3.0 * (query - uncond) + 6.0 * (cond - query), dim=1)
    assert torch.allclose(guide_logits(cond, uncond, 3.0, query, 6.0), expected, atol=1e-5)


def test_respaced_tables_equal_diffusers_at_full_length():
    sched = make_scheduler(TINY.codes, 10)
    full, taus = respaced_scheduler(TINY.codes, 10, 10)
    assert taus.tolist() == list(range(10))
    for name in ("log_at", "log_bt", "log_ct", "log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"):
        assert torch.equal(getattr(full, name), getattr(sched, name)), name
    short, taus = respaced_scheduler(TINY.codes, 10, 4)
    assert taus.tolist() == [0, 3, 6, 9]
    assert torch.allclose(short.log_cumprod_at[:4], sched.log_cumprod_at[taus])
    for i in range(4):  # each respaced step is a stochastic matrix, and they compose to the cumulative
        assert torch.allclose(transition_matrix(short, i, False).sum(1), torch.ones(TINY.codes + 1, dtype=torch.float64))
    product = transition_matrix(short, 0, False) @ transition_matrix(short, 1, False)
    assert torch.allclose(product, transition_matrix(sched, 3, True), atol=1e-5)


def test_transformer_forward_backward():
    torch.manual_seed(0)
    model = DiscreteDenoiser(TINY)
    x_t = torch.randint(0, TINY.codes + 1, (3, 16))
    emb = torch.randn(3, TINY.k + 1, TINY.clip_dim)
    out = model(x_t, torch.tensor([0, 4, 9]), emb, torch.tensor([False, True, False]))
    assert out.shape == (3, TINY.codes, 16)
    assert torch.allclose(out.exp().sum(1), torch.ones(3, 16), atol=1e-5)
    out[0, 0].sum().backward()
    assert model.transformer.latent_image_embedding.emb.weight.grad is not None
    assert all(p.grad is None for p in model.vq.parameters())
    # per-sample timesteps: a row's output depends on its own t only
    single = model(x_t[1:2], torch.tensor([4]), emb[1:2], torch.tensor([True]))
    assert torch.allclose(single, out[1:2], atol=1e-5)
    with pytest.raises(ValueError, match="clip_dim"):
        model(x_t, torch.tensor([0, 0, 0]), torch.randn(3, 2, 7))


def test_paper_size_config_has_the_papers_parameter_count():
    config = DiscreteConfig.paper()
    assert (config.layers, config.grid, config.codes, config.num_train_timesteps) == (24, 32, 2887, 100)
    count = count_parameters(config)
    print(f"paper-size discrete denoiser: {count / 1e6:.1f} M parameters")
    # the paper: "470 million parameters" (preprint A.2). diffusers' blocks at width 1024 (two
    # adaptive norms of 2.1 M each per block) + the 2-layer condition encoder come to 495.9 M: 5.5 %
    # above; the check is "within 6 % of 470 M"
    assert abs(count - 470e6) <= 0.06 * 470e6, count
    assert count == 495_949_127


@pytest.fixture
def token_pack(tmp_path):
    samples = make_samples(8, resolution=8)
    paths = [tmp_path / "pack" / "00000.tar", tmp_path / "pack" / "00001.tar"]
    paths[0].parent.mkdir()
    write_pack_shard(paths[0], samples[:5])
    write_pack_shard(paths[1], samples[5:])
    images = np.stack([s["image"] for s in samples])
    vq_dir = tmp_path / "pack" / "vq"
    train_vq(VQParams(steps=2, batch_size=4), VQConfig.from_dict(TINY.vq), images, vq_dir)
    vq_checkpoint = latest_checkpoint(vq_dir / "checkpoints")
    vq, _ = load_vq(vq_checkpoint)
    tokens_path = vq_dir / "tokens.npz"
    np.savez(tokens_path, keys=np.array([s["key"] for s in samples][::-1]), tokens=tokenize(vq, images)[::-1])
    return paths, tokens_path, vq_checkpoint


def tiny_params(**overrides):
    return TrainParams(**{**dict(steps=8, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1,
                                 seed=0, query_drop_prob=0.5, query_noise=0.3), **overrides})


def test_discrete_trainer_resumes_exactly_after_a_kill(token_pack, tmp_path):
    paths, tokens, vq = token_pack
    train_discrete(tiny_params(), TINY, paths, tokens, vq, tmp_path / "straight")
    cut = tmp_path / "cut"
    train_discrete(tiny_params(stop_at_step=5), TINY, paths, tokens, vq, cut)
    (cut / "checkpoints" / "step_0000005.pt").unlink()  # killed after step 5, before its checkpoint
    train_discrete(tiny_params(), TINY, paths, tokens, vq, cut)
    read = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path / "straight", cut)]
    assert [m["step"] for m in read[1]] == list(range(1, 9))
    assert [(m["loss"], m["lr"]) for m in read[0]] == [(m["loss"], m["lr"]) for m in read[1]]
    a, b = (torch.load(latest_checkpoint(d / "checkpoints"), weights_only=True) for d in (tmp_path / "straight", cut))
    assert a["backbone"] == b["backbone"] == "discrete"
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    assert a["data_position"] == b["data_position"]
    with pytest.raises(ValueError, match="another model config"):
        train_discrete(tiny_params(), DiscreteConfig.tiny(layers=1), paths, tokens, vq, cut)


def test_sampling_is_deterministic_per_seed_and_per_image(token_pack, tmp_path):
    paths, tokens, vq = token_pack
    train_discrete(tiny_params(steps=2), TINY, paths, tokens, vq, tmp_path / "train")
    model = load_model(latest_checkpoint(tmp_path / "train" / "checkpoints"))
    assert isinstance(model, DiscreteDenoiser)
    emb = torch.randn(2, TINY.k + 1, TINY.clip_dim, generator=torch.Generator().manual_seed(0))

    def run(seeds, rows=slice(None), **kw):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_discrete(model, emb[rows], steps=5, guidance=3.0, generator=gens, **kw)

    a = run([0, 1])
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, run([0, 1]))
    assert np.array_equal(a[1:], run([1], rows=slice(1, 2)))  # image i of a batch = a batch of one
    edited = run([0, 1], init_image=np.full_like(a[0], 255), strength=0.4)  # editing from a white picture
    assert np.array_equal(edited, run([0, 1], init_image=np.full_like(a[0], 255), strength=0.4))
    assert not np.array_equal(edited, a)  # the partly corrupted start changes the tokens
    from model import diffusion
    one = torch.Generator().manual_seed(4)
    via = diffusion.sample(model, emb[:, :1], steps=3, guidance=1.0, generator=one)  # --no-knn, no guidance
    assert via.shape == (2, 8, 8, 3)
    two_scale = diffusion.sample(model, emb, steps=5, guidance=3.0, generator=[torch.Generator().manual_seed(s) for s in
                                                                                 (0, 1)], neighbour_guidance=3.0)
    assert np.array_equal(two_scale, a)  # equal scales: plain guidance, the same tokens
    assert not np.array_equal(run([0, 1], neighbour_guidance=12.0), a)  # the discrete sampler takes the third pass too


@pytest.mark.skipif(not os.environ.get("KNND_RAY_TESTS"),
                    reason="starts a local Ray (~45 s on 2 cores); set KNND_RAY_TESTS=1")
def test_discrete_ray_train_two_cpu_workers_with_ddp(token_pack, tmp_path):
    paths, tokens, vq = token_pack
    result = train_discrete(tiny_params(steps=4, batch_size=2, num_workers=2), TINY, paths, tokens, vq, tmp_path / "train")
    assert result["step"] == 4
    state = torch.load(result["checkpoint"], weights_only=True)
    assert state["step"] == 4 and state["backbone"] == "discrete"
    assert state["data_position"] == [1, 4]  # 8 samples / 2 ranks / batch 2: 2 batches an epoch


def test_codebook_starts_on_encoder_outputs():
    from model.vq_train import init_codebook, to_tensor

    torch.manual_seed(0)
    vq = build_vq(VQConfig.from_dict(TINY.vq))
    images = np.stack([s["image"] for s in make_samples(6, resolution=8)])
    init_codebook(vq, images, seed=0)
    with torch.no_grad():
        latents = vq.encode(to_tensor(images)).latents.permute(0, 2, 3, 1).reshape(-1, 4)
    codes = vq.quantize.embedding.weight.detach()
    assert torch.cdist(codes, latents).min(dim=1).values.max() < 1e-5  # every code is some latent
