"""JAXopt's lasso and sparse-coding examples as specs (problems/sparse_hpo/diabetes_lasso.yaml,
sparse_coding.yaml), matched against JAXopt's own numbers.

The numbers were computed by benchmarks/jaxopt_reference.py with jax 0.10.2, jaxlib 0.10.2,
jaxopt 0.8.5, optax 0.2.8, numpy 2.4.6 and scikit-learn 1.9.1, in float64, with JAXopt's inner
solvers run to convergence (tol 1e-13; the lasso example's own 500 iterations at tol 1e-3 stop
far from it: its two solvers then differ by 30% on the hypergradient) and its implicit linear
systems solved to tol 1e-14; the script's docstring says what each example computes and the one
change to the sparse-coding data (JAX's 1e-4 noise left out). JAX is not needed to run this test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import bilevel
from bilevel.compile import compile_spec
from bilevel.engines import build_engine
from bilevel.planner import make_plan
from bilevel.presets import find_preset
from bilevel.spec import load_spec

JAXOPT_VERSION = "0.8.5"

# lasso_implicit_diff.py: BlockCoordinateDescent + prox_lasso on the diabetes data, lam = exp(theta)
LASSO_VALUE_AT_THETA_1 = 27123.59561014421
LASSO_DTHETA_AT_THETA_1 = 155.65926272578054
LASSO_SOLUTION_AT_THETA_1 = [0.0, 0.0, 60.18690007522404, 55.25163727417484, 0.0, 0.0, -18.784002142580256, 0.0,
                             44.65546764621078, 0.0]
LASSO_ADAM_LOSSES = [27123.59561014421, 27122.061741427293, 27120.573911561944, 27119.131817202848, 27117.73508322855,
                     27116.38326501992, 27115.07585117814, 27113.812266645247, 27112.591876184742, 27111.41398817783]
LASSO_THETA_AFTER_10_STEPS = 0.9010972123345118

# sparse_coding.py: ProximalGradient + prox_elastic_net codes; the dictionary loss and its gradient at the SVD start
CODING_VALUE = 0.0222646994877534
CODING_ZERO_CODES = 107  # of 74 x 7
CODING_GRAD = [
    [-0.005244909845229621, -0.0023066608650639748, -0.0036384218005371914, -0.0027915490427531074, 0.0020779648203706237, -0.0027198537615418586, -0.0013146992714268158, -0.0005987444766403878, 0.0034281040477018273, 0.003662014605783071, 0.000915096841493851, 0.0017885320897012922, -0.00284300188096228],
    [0.002201273466521495, -0.00039755855559466154, -5.480346601314818e-05, -0.0013906826891213295, -0.0021634259645003408, 0.00021888739824040514, -0.005154309377005083, 0.00544993074480834, -0.0035680140183535266, -0.0003842660646189034, -0.00011973983604525364, -0.0037289881808752856, -0.002636542107624363],
    [0.001028902548998791, 0.0017435069705170614, 0.0008332838064548185, -0.005079412221337169, 0.0004338793509494768, 0.001700182561283575, 0.0004926361122408827, -0.002485903426882602, -0.0002043148380738541, 0.005431687253320883, 0.0022453087710504454, 0.002367907211089929, -0.0020926774820752875],
    [-0.0005195093467591132, -0.0014255566308898557, -0.0008150842334753244, 0.0008119978863716992, 0.0030360435284128764, -8.98265418886224e-05, 0.0009171268892852042, -0.001891212484231032, 0.0021758261205339874, 0.0024969101210950083, -0.0004343761271728365, 0.00031889975374275233, -0.0027868637239015157],
    [0.0032648871296147852, 0.0019368086247057038, 0.00063956776068455, 0.0010599167470140482, 8.833430008039437e-05, 0.0008970198863514337, 0.002530074153162228, -0.0034004327661710035, -0.0004714564501789178, 0.0008043228025099523, -0.0010280478970222297, 0.0005719909344969053, -0.0002804331391010556],
    [-0.00035415110329601733, -0.0013513613519449844, -0.001539247205297389, -0.0007949334168946944, 0.0025759311142618964, 0.0019380694504601934, 0.0008015396152294624, 0.0018407956867342225, -0.0006689999120197323, 0.0017270521355337385, 0.0009208518648220968, -0.002862636474959715, 0.0031603352739907778],
    [-0.0008331546384866188, -0.000263822375566403, -0.00030699984312510995, 0.0004708247851051143, 0.001199615298407849, -0.0018190098738846516, -0.0011593502557736965, -0.0020789640684226156, 0.002211000376611702, -0.001608965625884893, 0.0005837380625649002, 0.0020169472292855322, 0.0004418401778998565],
]


def _hypergrad(preset: str):
    problem = compile_spec(load_spec(find_preset(preset)), "cpu")
    plan = make_plan(problem)
    engine = build_engine(plan.engine)
    x = problem.fresh(problem.upper.init)
    return problem, plan, engine.hypergrad(problem, x, engine.init(problem, x), problem.upper.batch())


def test_the_lasso_example_matches_jaxopt_at_its_start() -> None:
    problem, plan, result = _hypergrad("sparse_hpo/diabetes_lasso")
    assert plan.engine.kind == "implicit"
    w = result.state.lower[0]
    assert torch.equal(w != 0, torch.tensor(LASSO_SOLUTION_AT_THETA_1) != 0)  # the same 4 of 10 features
    assert float((w - torch.tensor(LASSO_SOLUTION_AT_THETA_1, dtype=w.dtype)).abs().max()) < 1e-9
    assert abs(float(result.upper_loss) - LASSO_VALUE_AT_THETA_1) < 1e-12 * LASSO_VALUE_AT_THETA_1
    # the raw variable of a log-scale hyperparameter is theta = log lam: its hypergradient is d/dtheta
    assert abs(float(result.grad[0]) - LASSO_DTHETA_AT_THETA_1) < 1e-10 * LASSO_DTHETA_AT_THETA_1
    assert float(result.stats.inner_residual) < 1e-8


def test_the_lasso_example_run_matches_jaxopt_step_by_step(tmp_path: Path) -> None:
    """Ten steps of Adam (lr 1e-2; torch.optim.Adam and optax.adam are the same formula) with each
    inner solve warm-started at the previous solution, as in the example."""
    result = bilevel.run(load_spec(find_preset("sparse_hpo/diabetes_lasso")), device="cpu", out=tmp_path, progress=False)
    losses = [json.loads(line)["upper_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10
    for ours, theirs in zip(losses, LASSO_ADAM_LOSSES):
        assert abs(ours - theirs) < 1e-11 * theirs
    theta = math.log(result.result["upper_variables"]["l1"])
    assert abs(theta - LASSO_THETA_AFTER_10_STEPS) < 1e-10


def test_the_sparse_coding_example_matches_jaxopt() -> None:
    problem, plan, result = _hypergrad("sparse_hpo/sparse_coding")
    codes = result.state.lower[0]
    assert int((codes == 0).sum()) == CODING_ZERO_CODES
    assert abs(float(result.upper_loss) - CODING_VALUE) < 1e-12 * CODING_VALUE
    reference = torch.tensor(CODING_GRAD, dtype=torch.float64)
    assert result.grad[0].shape == reference.shape
    assert float((result.grad[0] - reference).norm() / reference.norm()) < 1e-10

