"""SoftREPA: the B x B error matrix, what trains, token insertion through hooks, the loss, the base checkpoint."""

import pytest
import torch

from mmalign.t2i.softrepa import SoftTokens, error_matrix, offset_index, softrepa_loss

from tests._t2i import make, one_thread  # noqa: F401 (one_thread: autouse fixture)

CAPTIONS = ["a red circle", "a small blue star in the top left on a black background", "a green cross", "a yellow square"]


def base(backbone="mmdit", **kw):
    return make(backbone, {"num_layers": 3, "patch_size": 4, "num_attention_heads": 2, "attention_head_dim": 16}, **kw)


@pytest.fixture(scope="module", params=["mmdit", "unet"])
def base_ckpt(request, tmp_path_factory):
    m = base(request.param)
    with torch.no_grad():  # an EMA that differs from the live weights: the base must start from the EMA
        for p in m.ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("t2i") / f"{request.param}.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    return request.param, str(path), m


def soft_model(kind, path, **soft):
    m = base(kind, softrepa={"n_layers": 2, "n_tokens": 3, **soft}, init_checkpoint=path,
             optim={"lr": 1e-3, "weight_decay": 1e-4, "schedule": "constant"})
    with torch.no_grad():  # larger than the paper's 0.02 init, so a token that reached the output would show
        m.soft.tokens.normal_(std=1.0)
        if m.soft.offsets is not None:
            m.soft.offsets.weight.normal_(std=1.0)
    return m


def inputs(m, n=4, t=0.37):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return x, torch.full((n,), t), m.encode_text(CAPTIONS[:n])


def test_base_weights_are_the_checkpoints_ema(base_ckpt):
    kind, path, ref = base_ckpt
    m = soft_model(kind, path)
    for (n, p), q in zip(m.backbone.named_parameters(), ref.ema.module.parameters()):
        assert torch.equal(p, q), n


def test_error_matrix_equals_separate_denoising_calls(base_ckpt):
    kind, path, _ = base_ckpt
    m = soft_model(kind, path)
    x, _, text = inputs(m, n=3)
    noise, t = torch.randn(1, 3, 32, 32), torch.tensor(0.43)
    with torch.no_grad():
        got = error_matrix(m.backbone, x, noise, t, text, chunk=4)  # chunks that cut across images
        want = torch.empty(3, 3)
        for b in range(3):
            x_t = (1 - t) * x[b: b + 1] + t * noise
            for p in range(3):
                pred = m.backbone(x_t, t.reshape(1), text.index(torch.tensor([p])))
                want[b, p] = (pred - (noise - x[b: b + 1])).pow(2).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, got.T)  # rows are images, columns captions: not symmetric


def test_only_the_soft_tokens_train(base_ckpt):
    kind, path, _ = base_ckpt
    m = soft_model(kind, path)
    soft = {id(p) for p in m.soft.parameters()}
    optimized = {id(p) for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert optimized == soft and soft
    x, _, _ = inputs(m)
    loss = m.training_step({"image": x.clamp(-1, 1), "text": CAPTIONS}, 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.soft.parameters())
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is None for p in m.text_encoder.parameters())
    assert m.ema is None and not any(k.startswith("text_encoder") for k in m.state_dict())
    n = sum(p.numel() for p in m.soft.parameters())
    width = 32 if kind == "mmdit" else m.backbone.net.config.cross_attention_dim
    expected = 2 * 3 * 384 + 100 * width * 2 if kind == "mmdit" else 3 * 384 + 100 * width
    assert n == expected


def test_removing_the_soft_tokens_restores_the_base_output(base_ckpt):
    kind, path, _ = base_ckpt
    plain = soft_model(kind, path)
    x, t, text = inputs(plain)
    with torch.no_grad():
        with_tokens = plain.backbone(x, t, text)
        plain.soft.detach()
        without = plain.backbone(x, t, text)
        ref = base(kind, init_checkpoint=path).backbone(x, t, text)  # a model that never had tokens
    assert torch.equal(without, ref)
    assert not torch.allclose(with_tokens, ref, atol=1e-4)  # the tokens did change the output while attached


def test_mmdit_tokens_enter_the_first_blocks_only_and_are_stripped():
    m = base()
    soft = SoftTokens(m.backbone, n_layers=2, n_tokens=3).attach(m.backbone)
    seen = []
    for block in m.backbone.net.transformer_blocks:
        block.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]),
                                        with_kwargs=True)
    x, t, text = inputs(m, n=2)
    with torch.no_grad():
        m.backbone(x, t, text)
    L = m.cfg.text.max_tokens
    # hooks run in registration order: the soft-token pre-hook first, so blocks 0, 1 see L + 3, block 2 sees L
    assert seen == [L + 3, L + 3, L]
    soft.detach()


def test_timestep_offsets_follow_t_buckets_of_ten():
    assert offset_index(torch.tensor([0.0, 9.99, 10.0, 505.0, 999.0, 1000.0])).tolist() == [0, 0, 1, 50, 99, 99]
    m = base()
    soft = SoftTokens(m.backbone, n_layers=2, n_tokens=2).attach(m.backbone)
    seen = []
    m.backbone.net.transformer_blocks[1].register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["encoder_hidden_states"][:, :2]), with_kwargs=True)  # after the insertion
    with torch.no_grad():
        soft.offsets.weight.normal_(std=1.0)
        x, _, text = inputs(m, n=1)
        for t in (0.501, 0.5095, 0.512):  # timesteps 501 and 509.5: bucket 50; 512: bucket 51
            m.backbone(x, torch.full((1,), t), text)
        width = m.backbone.net.config.caption_projection_dim
        expected = m.backbone.net.context_embedder(soft.tokens[1]) + soft.offsets.weight[50, width:]  # block 1's half
    assert torch.equal(seen[0], seen[1]) and not torch.allclose(seen[0], seen[2])
    torch.testing.assert_close(seen[0][0], expected)
    soft.detach()


def test_softrepa_loss_is_the_papers():
    errors = torch.tensor([[0.10, 0.30, 0.50], [0.40, 0.20, 0.60], [0.30, 0.35, 0.05]])
    logits = 4.0 * torch.exp(-errors / 0.07)
    ce = -torch.log_softmax(logits, 1).diagonal().mean()
    torch.testing.assert_close(softrepa_loss(errors), ce)
    torch.testing.assert_close(softrepa_loss(errors, dweight=10.0), ce + 10.0 * errors.diagonal().mean())
    assert softrepa_loss(errors) < softrepa_loss(errors[:, [1, 2, 0]])  # matching captions off the diagonal: worse


def test_softrepa_needs_a_trained_base_and_its_text_encoder(base_ckpt, tmp_path):
    kind, path, _ = base_ckpt
    with pytest.raises(ValueError, match="init_checkpoint is null"):
        base(kind, softrepa={})
    with pytest.raises(ValueError, match="text encoder"):
        base(kind, softrepa={}, init_checkpoint=path, text={"max_tokens": 16})
    with pytest.raises(ValueError, match="n_layers must be in"):
        base("mmdit", softrepa={"n_layers": 9}, init_checkpoint=path) if kind == "mmdit" else SoftTokens(
            base("mmdit").backbone, n_layers=9)
