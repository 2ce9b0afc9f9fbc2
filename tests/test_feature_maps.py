import json

import pytest
import torch

from t2r.feature_maps import FEATURE_MAPS, FeatureMap, FeatureMapError, Registry, build_feature_map

H, D = 3, 16
ALL_MAPS = ["elu", "hedgehog", "performer", "relu", "rfa", "t2r", "taylor"]
LEARNED_MAPS = ["t2r", "hedgehog", "taylor"]
RANDOM_MAPS = ["rfa", "performer"]
# A non-default feature_dim per map (elu/relu only allow head_dim).
OTHER_FEATURE_DIM = {"elu": D, "relu": D, "t2r": 8, "rfa": 8, "performer": 8, "hedgehog": 8, "taylor": 4}
EXPECTED_OUT_DIM = {  # (feature_dim=None, OTHER_FEATURE_DIM) for head_dim 16
    "elu": (16, 16),
    "relu": (16, 16),
    "t2r": (32, 8),
    "rfa": (64, 16),
    "performer": (64, 8),
    "hedgehog": (128, 16),
    "taylor": (1 + 16 + 256, 1 + 4 + 16),
}
# Options that give every map a parameter where it can have one (taylor needs feature_dim != D).
WITH_PARAMS = {"t2r": {}, "hedgehog": {}, "taylor": {"feature_dim": 4}}


def _qk(batch=2, time=5, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, time, H, D, generator=g) * scale
    k = torch.randn(batch, time, H, D, generator=g) * scale
    return q.to(dtype), k.to(dtype)


def _build(name, **kwargs):
    torch.manual_seed(0)
    return build_feature_map(name, num_heads=H, head_dim=D, **kwargs)


def test_registry_lists_every_map():
    assert FEATURE_MAPS.names() == ALL_MAPS


def test_registry_rejects_duplicates_and_stamps_name():
    registry = Registry("widget", FeatureMapError)

    @registry.register("a")
    class A:
        pass

    assert registry.get("a") is A and A.name == "a"
    with pytest.raises(FeatureMapError, match="already registered"):
        registry.register("a")


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("which", [0, 1], ids=["default_dim", "other_dim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shape_dtype_finite(name, which, dtype):
    feature_dim = [None, OTHER_FEATURE_DIM[name]][which]
    fm = _build(name, feature_dim=feature_dim)
    assert isinstance(fm, FeatureMap) and fm.name == name
    assert fm.out_dim == EXPECTED_OUT_DIM[name][which]
    q, k = _qk(dtype=dtype)
    phi_q, phi_k = fm(q, k)
    for phi in (phi_q, phi_k):
        assert phi.shape == (2, 5, H, fm.out_dim)
        assert phi.dtype == torch.float32
        assert torch.isfinite(phi).all()
    assert all(t.dtype == torch.float32 for t in [*fm.parameters(), *fm.buffers()])


@pytest.mark.parametrize("name", ALL_MAPS)
def test_accepts_any_leading_dims(name):
    fm = _build(name)
    q, k = _qk()
    phi_q, phi_k = fm(q[:, 0], k[:, 0])  # a recurrent step: (B, H, D)
    full_q, full_k = fm(q, k)
    torch.testing.assert_close(phi_q, full_q[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi_k, full_k[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("tie_qk", [True, False])
def test_gradients_reach_inputs_and_parameters(name, tie_qk):
    options = dict(WITH_PARAMS.get(name, {}), **({"tie_qk": tie_qk} if name in LEARNED_MAPS else {}))
    fm = _build(name, **options)
    q, k = _qk(scale=0.5)
    q.requires_grad_(True)
    k.requires_grad_(True)
    phi_q, phi_k = fm(q, k)
    g = torch.Generator().manual_seed(1)
    weights_q, weights_k = (torch.randn(phi_q.shape, generator=g) for _ in range(2))
    loss = (phi_q * weights_q).sum() + (phi_k * weights_k).sum()
    loss.backward()
    tensors = {"q": q, "k": k, **dict(fm.named_parameters())}
    if name in LEARNED_MAPS:
        assert len(tensors) > 2
    for label, t in tensors.items():
        assert t.grad is not None, label
        assert torch.isfinite(t.grad).all(), label
        assert t.grad.abs().sum() > 0, label


@pytest.mark.parametrize("name", LEARNED_MAPS)
def test_tie_qk_parameters_and_keys(name):
    options = WITH_PARAMS[name]
    tied, untied = _build(name, tie_qk=True, **options), _build(name, tie_qk=False, **options)
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_tied > 0 and n_untied == 2 * n_tied
    with_bias = name != "taylor"
    assert set(tied.state_dict()) == ({"weight", "bias"} if with_bias else {"weight"})
    assert set(untied.state_dict()) == (
        {"weight", "weight_k", "bias", "bias_k"} if with_bias else {"weight", "weight_k"}
    )

    q, _ = _qk()
    phi_q, phi_k = tied(q, q.clone())
    torch.testing.assert_close(phi_q, phi_k, rtol=0, atol=0)


def test_default_tie_qk():
    assert _build("t2r").tie_qk is True
    assert _build("hedgehog").tie_qk is False
    assert _build("taylor", feature_dim=4).tie_qk is True


def test_untied_t2r_maps_q_and_k_differently():
    fm = _build("t2r", tie_qk=False)
    q, _ = _qk()
    phi_q, phi_k = fm(q, q.clone())
    assert not torch.allclose(phi_q, phi_k)


def test_unknown_name_lists_known_names():
    with pytest.raises(FeatureMapError) as info:
        build_feature_map("softmax", num_heads=H, head_dim=D)
    message = str(info.value)
    assert "unknown feature map 'softmax'" in message
    for name in ALL_MAPS:
        assert name in message


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_feature_dim(name, bad):
    with pytest.raises(FeatureMapError, match="feature_dim must be a positive integer, got"):
        build_feature_map(name, num_heads=H, head_dim=D, feature_dim=bad)


@pytest.mark.parametrize("field", ["num_heads", "head_dim"])
@pytest.mark.parametrize("bad", [0, -1])
def test_bad_sizes(field, bad):
    sizes = {"num_heads": H, "head_dim": D, field: bad}
    with pytest.raises(FeatureMapError, match=f"{field} must be a positive integer"):
        build_feature_map("t2r", **sizes)


@pytest.mark.parametrize("name", ["elu", "relu"])
def test_elementwise_maps_reject_other_feature_dim(name):
    with pytest.raises(FeatureMapError, match="feature_dim=None or 16"):
        build_feature_map(name, num_heads=H, head_dim=D, feature_dim=8)


def test_unknown_and_bad_options():
    with pytest.raises(FeatureMapError, match="unknown option.*tie_qk.*no options"):
        build_feature_map("elu", num_heads=H, head_dim=D, tie_qk=True)
    with pytest.raises(FeatureMapError, match="it accepts: sigma, seed, redraw"):
        build_feature_map("rfa", num_heads=H, head_dim=D, temperature=2.0)
    with pytest.raises(FeatureMapError, match="tie_qk must be True or False"):
        build_feature_map("t2r", num_heads=H, head_dim=D, tie_qk="yes")
    with pytest.raises(FeatureMapError, match="sigma must be a positive number"):
        build_feature_map("rfa", num_heads=H, head_dim=D, sigma=0.0)
    with pytest.raises(FeatureMapError, match="seed must be a non-negative integer"):
        build_feature_map("performer", num_heads=H, head_dim=D, seed=-1)
    with pytest.raises(FeatureMapError, match="project=False"):
        build_feature_map("taylor", num_heads=H, head_dim=D, feature_dim=4, project=False)


def test_wrong_input_shape():
    fm = _build("elu")
    q, k = _qk()
    with pytest.raises(FeatureMapError, match=r"expects k of shape \[B, T, H=3, D=16\]"):
        fm(q, k[..., :8])


@pytest.mark.parametrize("name", [n for n in ALL_MAPS if n not in ("rfa", "taylor")])
def test_features_are_non_negative(name):
    fm = _build(name, **WITH_PARAMS.get(name, {}))
    phi_q, phi_k = fm(*_qk(scale=3.0))
    assert (phi_q >= 0).all() and (phi_k >= 0).all()


@pytest.mark.parametrize("name", [n for n in ALL_MAPS if n != "rfa"])
def test_kernel_is_non_negative(name):
    fm = _build(name, **WITH_PARAMS.get(name, {}))
    phi_q, phi_k = fm(*_qk(scale=3.0))
    scores = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)  # (B, H, T, T)
    assert (scores >= 0).all()
    if name == "taylor":
        assert (scores > 0).all()


def test_hedgehog_rows_sum_to_two():
    phi_q, phi_k = _build("hedgehog", feature_dim=8)(*_qk(scale=3.0))
    torch.testing.assert_close(phi_q.sum(-1), torch.full(phi_q.shape[:-1], 2.0))
    torch.testing.assert_close(phi_k.sum(-1), torch.full(phi_k.shape[:-1], 2.0))


@pytest.mark.parametrize("options", [{}, {"feature_dim": 4}, {"feature_dim": 24, "tie_qk": False}])
def test_taylor_is_exact_second_order_expansion(options):
    fm = _build("taylor", **options)
    q, k = _qk()
    phi_q, phi_k = fm(q, k)
    scores = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)  # (B, H, T, T)
    if fm.has_projection:
        wq = fm.weight
        wk = fm.weight if fm.tie_qk else fm.weight_k
        q, k = torch.einsum("bthd,hfd->bthf", q, wq), torch.einsum("bthd,hfd->bthf", k, wk)
    s = torch.einsum("bthf,bshf->bhts", q, k) / fm.feature_dim**0.5  # (B, H, T, T)
    torch.testing.assert_close(scores, 1 + s + s**2 / 2, rtol=1e-5, atol=1e-5)


def test_taylor_projection_preserves_norm_on_average():
    for feature_dim in (4, 32):
        fm = _build("taylor", feature_dim=feature_dim)
        q, _ = _qk(batch=8, time=32)
        ratio = torch.einsum("bthd,hfd->bthf", q, fm.weight).norm(dim=-1) / q.norm(dim=-1)
        assert 0.7 < ratio.pow(2).mean().sqrt().item() < 1.3


def test_performer_estimates_softmax_kernel():
    fm = build_feature_map("performer", num_heads=1, head_dim=D, feature_dim=4096, seed=0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 1, D, generator=g) * 0.5
    k = torch.randn(1, 64, 1, D, generator=g) * 0.5
    phi_q, phi_k = fm(q, k)
    estimate = (phi_q * phi_k).sum(-1)  # (1, 64, 1): one pair (q_t, k_t) per t
    exact = torch.exp((q * k).sum(-1) / D**0.5)
    relative_error = ((estimate - exact).abs() / exact).mean()
    assert relative_error < 0.08
    assert abs(estimate.mean() / exact.mean() - 1) < 0.05


def test_performer_rows_are_orthogonal_within_a_block():
    fm = _build("performer", feature_dim=2 * D + 4)
    rows = fm.weight[0, :D]  # (D, D): the first orthogonal block of head 0
    directions = rows / rows.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(directions @ directions.T, torch.eye(D), rtol=0, atol=1e-5)


def test_rfa_estimates_gaussian_kernel_of_unit_vectors():
    sigma = 2.0
    fm = build_feature_map("rfa", num_heads=1, head_dim=D, feature_dim=4096, sigma=sigma)
    q, k = _qk(batch=1, time=64)
    phi_q, phi_k = fm(q[:, :, :1], k[:, :, :1])
    estimate = (phi_q * phi_k).sum(-1)  # (1, 64, 1)
    qn, kn = (t[:, :, :1] / t[:, :, :1].norm(dim=-1, keepdim=True) for t in (q, k))
    exact = torch.exp(-(qn - kn).pow(2).sum(-1) / (2 * sigma**2))
    assert (estimate - exact).abs().max() < 0.05


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("which", [0, 1], ids=["default_dim", "other_dim"])
def test_config_round_trip(name, which):
    feature_dim = [None, OTHER_FEATURE_DIM[name]][which]
    fm = _build(name, feature_dim=feature_dim)
    config = fm.config()
    assert json.loads(json.dumps(config)) == config
    assert {"name", "num_heads", "head_dim", "feature_dim"} <= set(config)
    rebuilt = build_feature_map(**config)
    assert rebuilt.out_dim == fm.out_dim
    assert rebuilt.config() == config
    shapes = {key: tuple(t.shape) for key, t in fm.state_dict().items()}
    assert {key: tuple(t.shape) for key, t in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize("name", RANDOM_MAPS)
def test_random_maps_are_seeded(name):
    a, b, c = (_build(name, seed=s) for s in (0, 0, 1))
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    assert not torch.allclose(a.weight, c.weight)
    assert set(a.state_dict()) == {"weight"}


@pytest.mark.parametrize("name", ALL_MAPS)
def test_meta_construction_then_load(name):
    options = WITH_PARAMS.get(name, {})
    with torch.device("meta"):
        meta = build_feature_map(name, num_heads=H, head_dim=D, **options)
    tensors = [*meta.parameters(), *meta.buffers()]
    assert all(t.is_meta and t.dtype == torch.float32 for t in tensors)
    reference = _build(name, **options)
    loaded = meta.to_empty(device="cpu")
    loaded.load_state_dict(reference.state_dict())
    q, k = _qk()
    for got, want in zip(loaded(q, k), reference(q, k)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", RANDOM_MAPS)
def test_redraw_only_in_training(name):
    fm = _build(name, redraw=True)
    stored = fm.weight.clone()
    q, k = _qk()
    fm.train()
    first, second = fm(q, k), fm(q, k)
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(fm.weight, stored, rtol=0, atol=0)
    fm.eval()
    for a, b in zip(fm(q, k), fm(q, k)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", RANDOM_MAPS)
def test_redraw_uses_one_matrix_for_q_and_k(name):
    fm = _build(name, redraw=True).train()
    q, _ = _qk()
    phi_q, phi_k = fm(q, q.clone())
    torch.testing.assert_close(phi_q, phi_k, rtol=0, atol=0)


@pytest.mark.parametrize("name", RANDOM_MAPS)
def test_no_redraw_is_deterministic_in_training(name):
    fm = _build(name).train()
    q, k = _qk()
    for a, b in zip(fm(q, k), fm(q, k)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
