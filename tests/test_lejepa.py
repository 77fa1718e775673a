"""LeJEPA (Balestriero and LeCun 2025): the Epps-Pulley statistic against the paper's formula written as loops and
against its closed form; SIGReg and the whole loss against loops; 2 gloo processes against one process on the full
batch; the random directions (the same on every rank, new at every step); the method's training step recomputed
from its parts; one-line errors for bad settings."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ssl_lightning.losses.sigreg import epps_pulley, lejepa_loss, sigreg, slice_directions
from ssl_lightning.methods.lejepa import LeJEPA
from ssl_lightning.nn.masking import step_generator
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests import ddp_lejepa
from tests.tiny_methods import one_thread, tiny_data, tiny_trainer  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

VIT = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                     "num_heads": 2}}
RESNET = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}}
HEAD = {"projection_hidden_dim": 32, "projection_dim": 16, "num_slices": 8}


def tiny_lejepa(backbone: dict[str, Any] = VIT, **kwargs: Any) -> LeJEPA:
    torch.manual_seed(0)
    return LeJEPA(**{**backbone, **HEAD, "optim": OptimConfig(name="adamw", lr=1e-3), **kwargs})


# --- the paper's formulas, as loops -------------------------------------------------------------------------------


def reference_epps_pulley(x: list[float] | torch.Tensor, t_max: float = 5.0, num_knots: int = 17) -> torch.Tensor:
    """Algorithm 1 on one sample x_1..x_N: at each of ``num_knots`` knots t of [-t_max, t_max], the ECF
    ``(1/N) sum_n exp(i t x_n)``, ``|ECF - exp(-t^2/2)|^2 * exp(-t^2/2)``, then the trapezoid rule (``torch.trapz``
    written out) over the whole grid, times N."""
    n = len(x)
    knots = [-t_max + 2 * t_max * k / (num_knots - 1) for k in range(num_knots)]
    errors = []
    for t in knots:
        real = sum(torch.cos(t * x[i]) for i in range(n)) / n
        imag = sum(torch.sin(t * x[i]) for i in range(n)) / n
        target = math.exp(-t * t / 2)
        errors.append(((real - target) ** 2 + imag**2) * target)
    integral = sum((knots[k + 1] - knots[k]) * (errors[k] + errors[k + 1]) / 2 for k in range(num_knots - 1))
    return n * integral


def closed_form_epps_pulley(x: torch.Tensor) -> torch.Tensor:
    """The exact integral over the real line for a fixed sample: with ``w = phi = exp(-t^2/2)``,
    ``|ECF - phi|^2 = (1/N^2) sum_ij cos(t (x_i - x_j)) - (2/N) sum_i cos(t x_i) phi + phi^2`` and
    ``int cos(a t) exp(-b t^2) dt = sqrt(pi / b) exp(-a^2 / (4 b))`` give
    ``N [sqrt(2 pi)/N^2 sum_ij exp(-(x_i - x_j)^2 / 2) - 2 sqrt(pi)/N sum_i exp(-x_i^2 / 4) + sqrt(2 pi / 3)]``."""
    n = x.shape[0]
    pairs = torch.exp(-(x[:, None] - x[None, :]).square() / 2).sum()
    cross = torch.exp(-x.square() / 4).sum()
    return n * (math.sqrt(2 * math.pi) * pairs / n**2 - 2 * math.sqrt(math.pi) * cross / n + math.sqrt(2 * math.pi / 3))


def reference_sigreg(z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``(1/V) sum_v (1/M) sum_m EP({a_m . z_{n,v}}_n)``, every projection a loop over the K coordinates."""
    views, n, k = z.shape
    stats = []
    for v in range(views):
        for m in range(directions.shape[1]):
            samples = [sum(directions[j, m] * z[v, i, j] for j in range(k)) for i in range(n)]
            stats.append(reference_epps_pulley(samples))
    return sum(stats) / len(stats)


def reference_lejepa(z: torch.Tensor, num_global: int, directions: torch.Tensor, lambd: float) -> torch.Tensor:
    """Eq. 7-8 with Algorithm 2's normalization: ``mu_n`` the mean of image n's global views; the squared error of
    every view against it averaged over images, views and the K dimensions; ``(1 - lambda) pred + lambda SIGReg``."""
    views, n, k = z.shape
    total = 0.0
    for i in range(n):
        for d in range(k):
            mu = sum(z[v, i, d] for v in range(num_global)) / num_global
            total = total + sum((mu - z[v, i, d]) ** 2 for v in range(views))
    prediction = total / (n * views * k)
    return (1 - lambd) * prediction + lambd * reference_sigreg(z, directions)


# --- the Epps-Pulley statistic -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t_max", "num_knots"), [(5.0, 17), (3.0, 9), (4.0, 3)])
def test_epps_pulley_matches_the_formula_written_as_loops(t_max: float, num_knots: int) -> None:
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(12, generator=g, dtype=torch.float64) * 1.7 + 0.4,  # off-centre, too wide
               torch.rand(9, generator=g, dtype=torch.float64) * 4 - 1,
               torch.randn(16, generator=g, dtype=torch.float64)]
    for x in samples:
        torch.testing.assert_close(epps_pulley(x, t_max, num_knots), reference_epps_pulley(x, t_max, num_knots),
                                   rtol=1e-10, atol=1e-12)
    batch = torch.stack([samples[2], samples[2].flip(0) * 0.5])  # leading dimensions: one statistic per row
    expected = torch.stack([reference_epps_pulley(row, t_max, num_knots) for row in batch])
    torch.testing.assert_close(epps_pulley(batch, t_max, num_knots), expected, rtol=1e-10, atol=1e-12)


def test_epps_pulley_quadrature_matches_the_closed_form_for_gaussian_samples() -> None:
    g = torch.Generator().manual_seed(1)
    for n in (10, 100, 400):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        exact = closed_form_epps_pulley(x)
        # a fine grid on a wide interval: the integral itself (the formula, the weight, the factor N)
        torch.testing.assert_close(epps_pulley(x, t_max=12.0, num_knots=2001), exact, rtol=1e-9, atol=1e-9)
        # the paper's 17 knots on [-5, 5]: a quadrature error well under the statistic's own spread (~1)
        torch.testing.assert_close(epps_pulley(x), exact, rtol=0, atol=2e-3)
    wide = torch.randn(50, generator=g, dtype=torch.float64) * 3  # not N(0, 1): still the same integral
    torch.testing.assert_close(epps_pulley(wide, t_max=12.0, num_knots=2001), closed_form_epps_pulley(wide), rtol=1e-9,
                               atol=1e-9)


def test_epps_pulley_expectation_for_gaussian_samples_and_size_for_others() -> None:
    """For i.i.d. N(0, 1) samples E|ECF(t) - phi(t)|^2 = (1 - phi(t)^2) / N, so E[EP] = int (1 - exp(-t^2))
    exp(-t^2/2) dt = sqrt(2 pi) - sqrt(2 pi / 3) whatever N; any other law makes EP grow like N."""
    g = torch.Generator().manual_seed(2)
    draws = epps_pulley(torch.randn(20000, 32, generator=g, dtype=torch.float64))
    expected = math.sqrt(2 * math.pi) - math.sqrt(2 * math.pi / 3)
    assert abs(float(draws.mean()) - expected) < 3 * float(draws.std()) / math.sqrt(draws.numel())
    n = 4096
    gaussian = float(epps_pulley(torch.randn(n, generator=g, dtype=torch.float64)))
    uniform = float(epps_pulley((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3)))  # var 1
    two_points = float(epps_pulley(torch.randint(0, 2, (n,), generator=g).double() * 2 - 1))  # mean 0, var 1
    collapsed = float(epps_pulley(torch.zeros(n, dtype=torch.float64)))
    assert gaussian < 4 < 10 < uniform < two_points
    # one point: ECF = 1, N int (1 - phi)^2 phi dt = N (sqrt(2 pi) - 2 sqrt(pi) + sqrt(2 pi / 3))
    one_point = math.sqrt(2 * math.pi) - 2 * math.sqrt(math.pi) + math.sqrt(2 * math.pi / 3)
    assert collapsed == pytest.approx(n * one_point, rel=1e-3)


# --- SIGReg and the LeJEPA loss ------------------------------------------------------------------------------------


def test_slice_directions_are_unit_columns_drawn_from_the_generator() -> None:
    a = slice_directions(6, 5, torch.Generator().manual_seed(3))
    assert a.shape == (6, 5)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(5))
    torch.testing.assert_close(a, slice_directions(6, 5, torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, slice_directions(6, 5, torch.Generator().manual_seed(4)))


def test_sigreg_and_lejepa_loss_match_loops_in_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    scale = torch.linspace(0.3, 2.0, 4, dtype=torch.float64)  # anisotropic embeddings, some off-centre
    z = (torch.randn(4, 6, 4, generator=g, dtype=torch.float64) * scale + 0.2).requires_grad_()  # (V, N, K)
    directions = slice_directions(4, 3, g).double()
    torch.testing.assert_close(sigreg(z, directions), reference_sigreg(z, directions), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigreg(z[0], directions), reference_sigreg(z[:1], directions), rtol=1e-10, atol=1e-12)
    for num_global, lambd in [(2, 0.05), (1, 0.3), (4, 1.0)]:
        terms = lejepa_loss(z, num_global, directions, lambd)
        expected = reference_lejepa(z, num_global, directions, lambd)
        torch.testing.assert_close(terms.loss, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(terms.loss, (1 - lambd) * terms.prediction + lambd * terms.sigreg)
        (grad,) = torch.autograd.grad(terms.loss, z)
        (expected_grad,) = torch.autograd.grad(expected, z)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


def test_bf16_embeddings_are_scored_in_float32() -> None:
    """Under bf16 mixed precision the loss sums cos/sin over the batch and averages squared errors in float32:
    the same as float32 on the bf16-rounded embeddings, even inside autocast."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(3, 16, 8, generator=g).bfloat16()
    directions = slice_directions(8, 4, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = lejepa_loss(z, 2, directions, 0.05)
    expected = lejepa_loss(z.float(), 2, directions, 0.05)
    assert terms.loss.dtype == torch.float32
    torch.testing.assert_close(terms.loss, expected.loss, rtol=1e-6, atol=1e-7)


# --- 2 processes = 1 process ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One launch of ``tests/ddp_lejepa.py`` on 2 gloo processes; the one-process reference trains meanwhile."""
    tmp_path = tmp_path_factory.mktemp("ddp_lejepa")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.ddp_lejepa", str(tmp_path)], cwd=root, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:  # the reference trains while the DDP processes start
            reference, initial = ddp_lejepa.train_one_process(), ddp_lejepa.state(ddp_lejepa.build())
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, (tmp_path / "log.txt").read_text()[-4000:]
    return tmp_path, reference, initial


def test_two_processes_equal_one_process_on_the_full_batch(ddp_run: Any) -> None:
    """SIGReg and the LeJEPA loss with each rank holding half of the images: the statistic of the global batch on
    every rank, and the gradients of one process (after DDP's averaging); the method's directions are the same on
    both ranks and new at the next step."""
    result = torch.load(ddp_run[0] / "loss_checks.pt", weights_only=True)
    z, directions = ddp_lejepa.loss_inputs()
    for name in ("sigreg", "lejepa"):
        one = z.clone().requires_grad_()
        if name == "sigreg":
            value = sigreg(one, directions)
        else:
            value = lejepa_loss(one, ddp_lejepa.LOSS_GLOBAL, directions, ddp_lejepa.LOSS_LAMBDA).loss
        value.backward()
        if name == "sigreg":  # every rank computes the statistic of the global batch (the ECF over 16 rows)
            torch.testing.assert_close(result["sigreg_values"], value.detach().expand(2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result[f"{name}_grad"], one.grad, rtol=1e-10, atol=1e-12)
    directions_by_step = result["directions"]  # (step, rank, K, M)
    torch.testing.assert_close(directions_by_step[:, 0], directions_by_step[:, 1], rtol=0, atol=0)
    assert not torch.allclose(directions_by_step[0, 0], directions_by_step[1, 0])


def test_lightning_ddp_on_two_processes_gives_the_state_of_one_process(ddp_run: Any) -> None:
    """2 optimizer steps of the method under Lightning DDP against one process on the full batch: backbone and
    projector weights and BatchNorm buffers agree."""
    tmp_path, reference, initial = ddp_run
    tolerance = {"rtol": 1e-4, "atol": 5e-5}
    for prefix in ("backbone.", "projector."):
        moved = max(float((reference[k] - initial[k]).abs().max()) for k in reference if k.startswith(prefix))
        assert moved > 100 * tolerance["atol"], f"{prefix}* did not move in 2 steps: nothing to compare"
    for rank in range(ddp_lejepa.WORLD_SIZE):
        ours = torch.load(tmp_path / f"lejepa_rank{rank}.pt", weights_only=True)
        assert ours.keys() == reference.keys()
        keys = [k for k in reference if rank == 0 or not k.endswith(("running_mean", "running_var"))]
        wrong = [k for k in keys if not torch.allclose(ours[k], reference[k], **tolerance)]
        assert not wrong, f"rank {rank}: {len(wrong)} tensors differ from one process, e.g. {wrong[:3]}"


# --- the method ----------------------------------------------------------------------------------------------------


def test_training_step_recomputes_from_its_parts() -> None:
    """Every view (2 global 16 px + 2 local 8 px) through the backbone and the projector; the step's directions
    from (seed, optimizer step, micro-batch); the loss of the loop reference, its gradients, the logged terms."""
    model = tiny_lejepa(num_slices=3, sigreg_weight=0.2, slice_seed=11)
    batch = fixed_views(4, 16, num_views=2, num_local=2, local_size=8, seed=7)
    out, logged = run_training_step(model, batch, batch_idx=3, global_step=5, accumulate_grad_batches=2)
    out["loss"].backward()

    views = batch["views"]
    features = [model.backbone(torch.cat(views[:2])).chunk(2), model.backbone(torch.cat(views[2:])).chunk(2)]
    features = [*features[0], *features[1]]
    z = model.projector(torch.cat(features)).unflatten(0, (4, -1))
    directions = slice_directions(16, 3, step_generator(torch.device("cpu"), 11, 5, 1))  # batch 3 of 2: micro 1
    expected = reference_lejepa(z, 2, directions, 0.2)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["train/loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["train/sigreg"], reference_sigreg(z, directions).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["features"], features[0].detach())
    torch.testing.assert_close(out["embeddings"], z[0].detach())
    params = [p for p in model.parameters() if p.requires_grad]
    reference = torch.autograd.grad(expected, params, allow_unused=True)
    for param, grad in zip(params, reference):
        grad = torch.zeros_like(param) if grad is None else grad
        actual = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(actual, grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-7)
    assert float(model.backbone.model.patch_embed.proj.weight.grad.abs().max()) > 0  # the encoder learns
    # another optimizer step draws other directions, hence another SIGReg value on the same views
    _, later = run_training_step(model, batch, batch_idx=3, global_step=6, accumulate_grad_batches=2)
    assert not torch.allclose(later["train/sigreg"], logged["train/sigreg"])


def test_resnet_with_multi_crop_trains_through_lightning(tmp_path: Any) -> None:
    model = tiny_lejepa(RESNET)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, tiny_data(views=SimCLRViews(16, num_local=2, local_size=8)))
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [({"sigreg_weight": 1.5}, "sigreg_weight"), ({"sigreg_weight": -0.1}, "sigreg_weight"),
     ({"num_slices": 0}, "num_slices"), ({"num_global_views": 0}, "num_global_views"),
     ({"num_knots": 16}, "num_knots"), ({"t_max": 0.0}, "t_max")],
)
def test_bad_settings_fail_when_the_model_is_built(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(ValueError, match=setting) as error:
        tiny_lejepa(**kwargs)
    assert "\n" not in str(error.value)


def test_fewer_than_two_views_fail_with_one_line(tmp_path: Any) -> None:
    model = tiny_lejepa()
    with pytest.raises(ValueError, match="at least 2 views") as error:
        run_training_step(model, fixed_views(4, 16, num_views=1))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="at least 2 views"):
        lejepa_loss(torch.randn(1, 4, 3), 1, torch.randn(3, 2))
    with pytest.raises(ValueError, match="num_views: 2"):  # at the start of fit, before any step
        tiny_trainer(tmp_path, max_steps=1).fit(model, tiny_data(views=SimCLRViews(16, num_views=1)))


def test_projector_is_an_mlp_with_batchnorm_between_its_layers() -> None:
    model = tiny_lejepa(projection_layers=3)
    kinds = [type(m) for m in model.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.projector[-1].out_features == 16 and model.projector[0].in_features == model.backbone.feature_dim
