"""Self-Tuning Networks: the gating math of the STN layers, the perturbation distribution and its
gradient estimators, and the engine tuning discrete hyperparameters to choices known to be right."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf

from bilevel import compile_spec, run
from bilevel.hyperparameters import make_transform
from bilevel.spec import spec_from_data
from bilevel.stn import StnConv2d, StnLinear, StnTensor, dropout, hyper_input
from bilevel.stn.perturb import inverse_softplus, perturb
from problems.toy.stn import quadratic_stn_spec

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "runtime_data"))
import discrete_choice  # noqa: E402
import stn_ridge  # noqa: E402


@pytest.fixture(autouse=True)
def _float64():
    """Layers and tensors built here in float64 (restored after each test)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _randomize(layer: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


# --- layers -------------------------------------------------------------------------------------
def test_stn_linear_is_the_gated_sum_of_two_linear_maps() -> None:
    layer = StnLinear(5, 4, n_hyper=3)
    _randomize(layer)
    x, h = torch.randn(7, 5), torch.randn(3)
    V = layer.hyper_map.weight
    s_w, s_b = V[:4] @ h, V[4:] @ h
    expected = x @ layer.weight.T + layer.bias + s_w * (x @ layer.hyper_weight.T) + s_b * layer.hyper_bias
    torch.testing.assert_close(layer(x, h), expected, rtol=1e-12, atol=1e-12)
    # one setting per example: row i gated by h_i
    hs = torch.randn(7, 3)
    rows = torch.stack([layer(x[i : i + 1], hs[i])[0] for i in range(7)])
    torch.testing.assert_close(layer(x, hs), rows, rtol=1e-12, atol=1e-12)


def test_untrained_stn_layers_are_the_plain_layers() -> None:
    """V starts at zero: the response is learned, the initial network is the ordinary one."""
    layer = StnLinear(5, 4, n_hyper=2)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x, torch.randn(2)), nnf.linear(x, layer.weight, layer.bias))
    conv = StnConv2d(2, 3, 3, n_hyper=2, padding=1)
    image = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(conv(image, torch.randn(2)), conv.elem(image))


def test_stn_conv2d_gates_whole_output_channels() -> None:
    conv = StnConv2d(2, 3, 3, n_hyper=2, padding=1)
    _randomize(conv)
    image, h = torch.randn(2, 2, 6, 6), torch.randn(2)
    scales = conv.hyper_map.weight @ h
    expected = (nnf.conv2d(image, conv.elem.weight, conv.elem.bias, padding=1)
                + scales[:3, None, None] * nnf.conv2d(image, conv.hyper.weight, padding=1)
                + (scales[3:] * conv.hyper_bias)[:, None, None])
    torch.testing.assert_close(conv(image, h), expected, rtol=1e-12, atol=1e-12)


def test_stn_tensor_is_affine_in_the_conditioning() -> None:
    tensor = StnTensor([4], n_hyper=2)
    _randomize(tensor)
    h1, h2 = torch.randn(2), torch.randn(2)
    mid = tensor(0.5 * (h1 + h2))
    torch.testing.assert_close(mid, 0.5 * (tensor(h1) + tensor(h2)))
    torch.testing.assert_close(tensor(h1), tensor.value + (tensor.hyper_map.weight @ h1) * tensor.hyper_value)


def test_wrong_conditioning_width_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="n_hyper.*got shape \\[4\\]"):
        StnLinear(3, 2, n_hyper=3)(torch.randn(1, 3), torch.randn(4))


def test_dropout_at_a_tensor_rate_keeps_the_mean_and_passes_no_gradient() -> None:
    torch.manual_seed(0)
    rate = torch.tensor(0.3, requires_grad=True)
    x = torch.ones(200000)
    out = dropout(x, rate)
    assert float((out == 0).double().mean()) == pytest.approx(0.3, abs=5e-3)
    assert float(out.mean()) == pytest.approx(1.0, abs=1e-2)
    assert not out.requires_grad
    per_example = dropout(torch.ones(2, 50000), torch.tensor([0.0, 0.9]))
    assert float((per_example[0] == 0).double().mean()) == 0.0
    assert float((per_example[1] == 0).double().mean()) == pytest.approx(0.9, abs=1e-2)
    assert torch.equal(dropout(x, rate, training=False), x)


def test_hyper_input_concatenates_codes_in_declaration_order() -> None:
    data = discrete_choice.robust_spec()
    data["levels"]["upper"]["variables"] = {
        "rates": {"kind": "hyperparameter", "low": 0.0, "high": 1.0, "shape": [2], "init": 0.25},
        "absolute": {"kind": "hyperparameter", "type": "categorical", "choices": [False, True], "init": True},
        "k": {"kind": "hyperparameter", "type": "integer", "low": 1, "high": 4, "init": 2},
    }
    data["levels"]["lower"]["variables"]["w"]["kwargs"]["n_hyper"] = 5
    problem = compile_spec(spec_from_data(data))
    h = hyper_input(problem.upper.view(problem.upper.init))
    logit = math.log(0.25 / 0.75)
    u = (2 - 0.5) / 4  # integer 2's point of the latent (1/2, 9/2), as a fraction of its length
    k_raw = math.log(u / (1 - u))
    torch.testing.assert_close(h, torch.tensor([logit, logit, 0.0, 1.0, k_raw]))
    assert hyper_input(problem.upper.view(problem.upper.init), "k").shape == (1,)


# --- the perturbation ---------------------------------------------------------------------------
def _level(**variables):
    data = discrete_choice.robust_spec()
    data["levels"]["upper"]["variables"] = {name: {"kind": "hyperparameter", **v} for name, v in variables.items()}
    data["levels"]["lower"]["variables"]["w"]["kwargs"]["n_hyper"] = sum(
        len(v.get("choices", [])) or math.prod(v.get("shape", [])) or 1 for v in variables.values())
    data["levels"]["upper"]["objective"] = data["levels"]["lower"]["objective"] = "problems.toy.stn:quadratic_stn_upper"
    from bilevel.problem import Level

    problem_spec = spec_from_data(data).spec
    level = Level("upper", (), (), None)
    for name, var in problem_spec.levels["upper"].variables.items():
        transform, raw = make_transform(var, torch.device("cpu"), torch.float64)
        level.tensors[name] = len(level.init)
        level.init = (*level.init, raw)
        level.transforms[name] = transform
    return level


def test_continuous_perturbation_is_gaussian_in_raw_space_with_its_entropy() -> None:
    level = _level(rate={"low": 0.0, "high": 0.8, "init": 0.2, "shape": [3]})
    raw, sigma = level.init, 0.4
    scale = (torch.full_like(raw[0], inverse_softplus(sigma)),)
    torch.manual_seed(0)
    codes = torch.stack([perturb(level, raw, scale).drawn["rate"].code for _ in range(4000)])
    assert torch.allclose(codes.mean(0), raw[0], atol=0.03) and torch.allclose(codes.std(0), torch.full((3,), sigma), atol=0.02)
    draw = perturb(level, raw, scale)
    torch.testing.assert_close(draw.drawn["rate"].value, level.transforms["rate"].value(draw.drawn["rate"].code))
    assert float(draw.entropy) == pytest.approx(3 * (math.log(sigma) + 0.5 * math.log(2 * math.pi * math.e)), rel=1e-12)
    assert float(draw.log_prob) == 0.0  # pathwise: nothing to score


def test_integer_draws_score_their_gaussian_latent_or_pass_its_gradient_straight_through() -> None:
    level = _level(k={"type": "integer", "low": 1, "high": 10, "init": 5})
    r = level.init[0].clone().requires_grad_(True)
    s = torch.tensor(inverse_softplus(0.5), requires_grad=True)
    torch.manual_seed(3)
    draw = perturb(level, (r,), (s,), "reinforce")
    torch.manual_seed(3)
    moved = r.detach() + 0.5 * torch.randn_like(r)
    expected = torch.distributions.Normal(r, nnf.softplus(s)).log_prob(moved)
    torch.testing.assert_close(draw.log_prob, expected)
    assert int(draw.drawn["k"].value) == int(level.transforms["k"].value(moved))
    torch.testing.assert_close(draw.drawn["k"].code, level.transforms["k"].code(moved))
    torch.manual_seed(3)
    straight = perturb(level, (r,), (s,), "straight_through")
    torch.testing.assert_close(straight.drawn["k"].code.detach(), level.transforms["k"].code(moved))  # forward: the integer
    (grad_r,) = torch.autograd.grad(straight.drawn["k"].code.sum(), r)
    assert float(grad_r) == pytest.approx(1.0)  # backward: the continuous latent's
    assert float(straight.log_prob) == 0.0


def test_categorical_draws_follow_softmax_and_reinforce_is_unbiased() -> None:
    level = _level(choice={"type": "categorical", "choices": [10, 20, 30], "init": 20})
    r = torch.tensor([0.3, 1.0, -0.5], requires_grad=True)
    losses = torch.tensor([1.0, 0.0, 2.0])
    torch.manual_seed(0)
    counts, score = torch.zeros(3), torch.zeros(3)
    n = 6000
    for _ in range(n):
        draw = perturb(level, (r,), (torch.zeros(3),), "reinforce")
        index = int(draw.drawn["choice"].code.argmax())
        assert int(draw.drawn["choice"].value) == (10, 20, 30)[index]
        counts[index] += 1
        (g,) = torch.autograd.grad(losses[index] * draw.log_prob, r)
        score += g / n
    p = torch.softmax(r.detach(), 0)
    assert torch.allclose(counts / n, p, atol=0.02)
    exact = torch.autograd.functional.jacobian(lambda z: (torch.softmax(z, 0) * losses).sum(), r.detach())
    assert torch.allclose(score, exact, atol=0.05), (score, exact)
    draw = perturb(level, (r,), (torch.zeros(3),))
    assert float(draw.entropy.detach()) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-12)


# --- the engine on problems whose right choice is known ------------------------------------------
def test_the_right_number_of_active_features_is_known() -> None:
    """Least squares on the first k features: validation loss smallest at k = 3."""
    train, val = discrete_choice.train_data(), discrete_choice.val_data()
    losses = []
    for k in range(1, 11):
        w = torch.linalg.lstsq(train["X"][:, :k], train["t"][:, None]).solution[:, 0]
        losses.append(float(((val["X"][:, :k] @ w - val["t"]) ** 2).mean()))
    assert min(range(10), key=losses.__getitem__) + 1 == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stn_tunes_an_integer_hyperparameter_to_the_right_value(seed: int, tmp_path: Path) -> None:
    """From k = 8, REINFORCE on the integer's latent reaches k = 3 (the validation loss uses k
    directly: the score-function estimator sees that), with the engine's defaults: the initial
    sigma of 0.25 lets the draws settle on one integer (with the paper's 0.5, seeds 0-2 end at 4)."""
    data = discrete_choice.features_spec(steps=800, seed=seed)
    result = run(spec_from_data(data), out=tmp_path, progress=False)
    assert result.result["engine"] == "stn"
    assert result.result["upper_variables"]["k"] == 3


@pytest.mark.parametrize("estimator", ["reinforce", "straight_through"])
def test_stn_tunes_a_categorical_hyperparameter_to_the_right_choice(estimator: str, tmp_path: Path) -> None:
    """Training targets with outliers, clean validation: the absolute loss is right (least squares
    on the squared loss reaches a validation MSE of 35, the absolute loss about 5)."""
    data = discrete_choice.robust_spec(steps=300, discrete_estimator=estimator)
    result = run(spec_from_data(data), out=tmp_path, progress=False)
    assert result.result["upper_variables"]["absolute"] is True
    assert result.result["final_upper_loss"] < 10.0
    train = discrete_choice.train_data(n_train=40, outliers=0.2)
    val = discrete_choice.val_data(n_train=40, outliers=0.2)
    w = torch.linalg.lstsq(train["X"], train["t"][:, None]).solution[:, 0]
    assert float(((val["X"] @ w - val["t"]) ** 2).mean()) > 30.0


def test_stn_logs_its_perturbation_and_resumes_to_the_same_result(tmp_path: Path) -> None:
    constant = {"name": "adam", "lr": 0.05}  # a schedule would depend on run.steps, which differs below
    spec = quadratic_stn_spec(steps=6, checkpoint_every=3, outer=constant)
    straight = run(spec, out=tmp_path / "straight", progress=False)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["hvp_count"] == 0 and r["perturbation_scale"] > 0 and "perturbation_entropy" in r for r in records)
    first = quadratic_stn_spec(steps=3, checkpoint_every=3, outer=constant)
    run(first, out=tmp_path / "resumed", progress=False)
    resumed = run(spec, out=tmp_path / "resumed", resume=True, progress=False)
    torch.testing.assert_close(resumed.x[0], straight.x[0], rtol=0, atol=0)


def test_per_example_draws_give_one_setting_per_example() -> None:
    level = _level(rate={"low": 0.0, "high": 0.8, "init": 0.2}, l2={"log": True, "low": 1e-4, "high": 1.0, "init": 1e-2})
    scale = tuple(torch.full_like(r, inverse_softplus(0.5)) for r in level.init)
    draw = perturb(level, level.init, scale, per_example={"rate": 7})
    assert draw.drawn["rate"].value.shape == (7,) and draw.drawn["rate"].code.shape == (7, 1)
    assert draw.drawn["l2"].value.shape == () and draw.drawn["rate"].value.unique().numel() == 7
    from bilevel.problem import VariableView

    h = hyper_input(VariableView({}, lambda: {name: d.code for name, d in draw.drawn.items()}))
    assert h.shape == (7, 2)
    torch.testing.assert_close(h[:, 0], draw.drawn["rate"].code[:, 0])
    assert torch.equal(h[:, 1], draw.drawn["l2"].code.expand(7))  # the per-step draw, repeated


def test_stn_preset_with_per_example_dropout_rates(tmp_path: Path) -> None:
    from bilevel.presets import find_preset
    from bilevel.spec import load_spec

    overrides = ["run.steps=3", "engine.kind=stn", "engine.per_example=[dropout_in, dropout_hidden]"]
    result = run(load_spec(find_preset("hpo/mlp_stn"), overrides=overrides), device="cpu", out=tmp_path, progress=False)
    assert result.result["engine_config"]["per_example"] == ["dropout_in", "dropout_hidden"]
    assert 0.0 < result.result["upper_variables"]["dropout_in"] < 0.8


def test_per_example_draws_of_a_discrete_or_vector_variable_are_refused() -> None:
    from bilevel import make_plan
    from bilevel.spec import SpecError

    data = discrete_choice.features_spec(per_example=["k"])
    loaded = spec_from_data(data)
    with pytest.raises(SpecError) as info:
        make_plan(compile_spec(loaded))
    assert info.value.issues[0].path == "engine.per_example" and "continuous scalar" in str(info.value)


def test_the_final_evaluation_reports_the_trained_response_without_retraining_it(tmp_path: Path) -> None:
    """The model STN trained is the lower solution at the final hyperparameters: the report and
    final_upper_loss evaluate it as it was at the last step (the checkpoint written then), not after
    more training steps with a fresh optimizer, so its number is that of as many training steps as
    the run took."""
    result = run(spec_from_data(stn_ridge.spec(steps=5)), out=tmp_path, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["engine_state"]["lower"]
    assert all(torch.equal(y, s) for y, s in zip(result.y, saved))
    problem = compile_spec(spec_from_data(stn_ridge.spec()))
    with torch.no_grad():
        expected = problem.upper_objective(result.x, result.y, problem.upper.data.full)
    assert result.result["final_upper_loss"] == pytest.approx(float(expected), rel=1e-12)


def test_a_tuned_weight_decay_enters_training_at_the_drawn_value() -> None:
    """solver.tuned.weight_decay is coupled: wd/2 ||phi||^2 is part of the training objective, which
    STN evaluates at its drawn hyperparameters, so the response is fitted to the drawn decay (as to
    an L2 term written in the objective). Same code, another value: the objective moves by exactly
    (wd~ - wd)/2 ||phi||^2."""
    from bilevel.hyperparameters import Drawn

    problem = compile_spec(spec_from_data(stn_ridge.spec(wd=1e-2)))
    x, y, batch = problem.upper.init, problem.lower.init, problem.lower.data.full
    code = problem.upper.transform("wd").code(x[0])
    at_current = problem.lower_objective(x, y, batch)
    at_drawn = problem.lower_objective(x, y, batch, {"wd": Drawn(torch.tensor(0.5, dtype=torch.float64), code)})
    squared = sum(float((p * p).sum()) for p in y)
    assert float(at_drawn - at_current) == pytest.approx(0.5 * (0.5 - 1e-2) * squared, rel=1e-10)
