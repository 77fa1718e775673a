"""Method wiring of the multi-crop, masked and pretext methods: on a FIXED batch (fixed views, masks, token
positions, rotations, permutations and holes), ``training_step``'s loss equals the loss recomputed here from the
method's parts (backbone, heads, teacher, decoder) in the paper's pairing, and gradients flow where the paper says:
none into DINO's teacher or SwAV's frozen prototypes, none from visible MAE patches, unchosen MLM positions or
pixels outside an inpainting hole; MAE's encoder and the inpainting backbone never see what they must predict,
colorization's backbone sees only lightness. DINO's per-parameter clipping and teacher temperature schedule are
checked inside the method."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.losses import sinkhorn_knopp
from ssl_lightning.methods import DINO, MAE, Colorization, Inpainting, Jigsaw, MaskedLanguageModel, Rotation, SwAV
from ssl_lightning.nn.vit_mae import patchify, unpatchify
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms.pretext import lab_to_rgb, maximal_hamming_permutations, rgb_to_lab
from ssl_lightning.transforms.simclr import CIFAR10_MEAN, CIFAR10_STD
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step, stub_trainer

TASK_SEED = 1234  # the seed of the generator a pretext task / MAE step draws from, fixed here
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def step(model: nn.Module, views: list[torch.Tensor], **trainer: Any) -> dict[str, torch.Tensor]:
    """``training_step``'s output on these views under a stub trainer (``trainer``: step, epoch, ...)."""
    return run_training_step(model, {"views": views, "label": torch.full((views[0].shape[0],), -1)}, **trainer)[0]


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def assert_same_gradients(expected: torch.Tensor, params: list[nn.Parameter], skip: tuple[nn.Parameter, ...] = ()) -> None:
    """Each parameter's ``.grad`` (from the step's backward) equals d expected / d parameter, up to float
    rounding relative to the largest entry of that parameter's gradient."""
    reference = torch.autograd.grad(expected, params, allow_unused=True)
    for param, grad in zip(params, reference):
        if any(param is s for s in skip):
            continue
        grad = torch.zeros_like(param) if grad is None else grad
        actual = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(actual, grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-8)


def capture_output(module: nn.Module) -> list[torch.Tensor]:
    """The outputs of ``module``'s forward calls, kept with their gradient (``retain_grad``)."""
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.retain_grad()
        outputs.append(output)

    module.register_forward_hook(hook)
    return outputs


def seeded_task(model: nn.Module, monkeypatch: pytest.MonkeyPatch, attribute: str) -> None:
    """The method's per-step generator replaced by one seeded with ``TASK_SEED``: the draws are fixed here."""
    monkeypatch.setattr(model, attribute, lambda device, *key: torch.Generator(device=device).manual_seed(TASK_SEED))


def task_generator() -> torch.Generator:
    return torch.Generator().manual_seed(TASK_SEED)


# --- SwAV --------------------------------------------------------------------------------------------------


def test_swav_every_other_crop_predicts_the_sinkhorn_codes_of_each_global_crop() -> None:
    """Caron et al. 2020, eq. 1-3: codes q_i by Sinkhorn-Knopp on the scores of global crop i (no gradient);
    every other crop v (global or local) predicts q_i through softmax(z_v . c / T). The prototypes get no
    gradient during ``freeze_prototypes_steps`` and the same gradient as the reference afterwards."""
    temperature, epsilon, iterations = 0.1, 0.05, 3
    torch.manual_seed(0)
    model = SwAV(**BACKBONE, projection_hidden_dim=32, projection_dim=16, num_prototypes=10, temperature=temperature,
                 epsilon=epsilon, sinkhorn_iterations=iterations, freeze_prototypes_steps=2)
    views = fixed_views(8, 16, num_views=2, num_local=2, local_size=8)["views"]
    prototypes = model.prototypes.weight
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(10))

    def expected_loss() -> torch.Tensor:
        features = [model.backbone(torch.cat(views[:2])), model.backbone(torch.cat(views[2:]))]
        z = F.normalize(model.projector(torch.cat(features)), dim=1)
        scores = (z @ prototypes.T).chunk(4)
        terms = []
        for i in (0, 1):  # the crops whose codes are predicted
            codes = sinkhorn_knopp(scores[i].detach(), epsilon, iterations)
            assert not codes.requires_grad
            others = [v for v in range(4) if v != i]
            ce = [-(codes * F.log_softmax(scores[v] / temperature, dim=1)).sum(dim=1).mean() for v in others]
            terms.append(sum(ce) / len(others))
        return sum(terms) / 2

    params = trainable(model)
    for global_step, frozen in [(0, True), (1, True), (2, False)]:
        model.zero_grad()
        loss = step(model, views, global_step=global_step)["loss"]
        loss.backward()
        model._trainer = stub_trainer(global_step=global_step)
        model.on_after_backward()  # what Lightning calls after backward
        model._trainer = None
        expected = expected_loss()
        torch.testing.assert_close(loss, expected, **CLOSE)
        assert (prototypes.grad is None) == frozen, global_step
        assert_same_gradients(expected, params, skip=(prototypes,) if frozen else ())
        assert model.backbone.conv1.weight.grad.abs().sum() > 0


# --- DINO --------------------------------------------------------------------------------------------------


def tiny_dino(**kwargs: Any) -> DINO:
    torch.manual_seed(0)
    args: dict[str, Any] = {**BACKBONE, "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8,
                            "optim": OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04, warmup_epochs=0)}
    return DINO(**{**args, **kwargs})


@pytest.mark.parametrize("epoch", [0, 5, 40])
def test_dino_student_on_all_crops_matches_the_centered_sharpened_teacher_on_global_crops(epoch: int) -> None:
    """Caron et al. 2021, algorithm 1: the teacher (EMA copy, here moved away from the student as after some
    steps) sees only the 2 global crops; P_t = softmax((g_t - C) / tau_t) with tau_t linear from 0.04 to 0.07 over
    the warm-up epochs (``np.linspace``), then 0.07; the loss averages H(P_t(x_i), P_s(x_j)) over every
    (global i, crop j != i) pair. No gradient reaches the teacher; the center then moves by its EMA."""
    warmup_epochs, student_temperature = 11, 0.1
    model = tiny_dino(warmup_teacher_temperature=0.04, teacher_temperature=0.07,
                      warmup_teacher_temperature_epochs=warmup_epochs, student_temperature=student_temperature)
    teacher_modules = (model.teacher_backbone, model.teacher_head)
    with torch.no_grad():
        for param in (p for m in teacher_modules for p in m.parameters()):
            param.add_(0.1 * torch.randn_like(param))
        model.center.copy_(torch.randn(1, 32))
    center = model.center.clone()
    views = fixed_views(4, 16, num_views=2, num_local=3, local_size=8)["views"]
    teacher_inputs = capture_inputs(model.teacher_backbone)

    out, logged = run_training_step(model, {"views": views, "label": torch.zeros(4).long()}, current_epoch=epoch)
    out["loss"].backward()

    schedule = [0.04 + (0.07 - 0.04) * e / (warmup_epochs - 1) for e in range(warmup_epochs)]  # np.linspace
    tau_t = schedule[epoch] if epoch < warmup_epochs else 0.07
    assert float(logged["train/teacher_temperature"]) == pytest.approx(tau_t)
    assert teacher_inputs == [(8, 3, 16, 16)]  # the two global crops, once
    with torch.no_grad():
        teacher = model.teacher_head(model.teacher_backbone(torch.cat(views[:2])))
    student = model.head(torch.cat([model.backbone(torch.cat(views[:2])), model.backbone(torch.cat(views[2:]))]))
    t, s = teacher.chunk(2), student.chunk(5)
    pairs = [(i, j) for i in range(2) for j in range(5) if j != i]
    ce = [-(F.softmax((t[i] - center) / tau_t, dim=1) * F.log_softmax(s[j] / student_temperature, dim=1)).sum(1).mean()
          for i, j in pairs]
    expected = sum(ce) / len(pairs)
    torch.testing.assert_close(out["loss"], expected, **CLOSE)

    student_params = trainable(model.backbone, model.head)
    teacher_params = [p for m in teacher_modules for p in m.parameters()]
    assert not {id(p) for p in teacher_params} & {id(p) for p in student_params}
    assert all(p.grad is None and not p.requires_grad for p in teacher_params)
    assert_same_gradients(expected, student_params)
    torch.testing.assert_close(model.center, 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True), **CLOSE)


def capture_inputs(module: nn.Module) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    module.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_dino_clips_each_parameter_gradient_on_its_own_before_the_optimizer_step() -> None:
    """The reference code's ``clip_gradients``: a parameter whose gradient norm exceeds ``clip_grad`` is scaled
    to it, every other one is left exactly as it was (a global-norm clip would scale them all)."""
    model = tiny_dino(clip_grad=3.0, freeze_last_layer_epochs=0)
    step(model, fixed_views(4, 16, num_views=2, num_local=1, local_size=8)["views"], current_epoch=1)["loss"].backward()
    params = [p for p in trainable(model.backbone, model.head) if p.grad is not None]
    g = torch.Generator().manual_seed(0)
    for param in params:  # norms of 2.9: each under the limit, together far over it
        direction = torch.randn(param.shape, generator=g)
        param.grad = direction * 2.9 / direction.norm()
    huge = model.backbone.conv1.weight
    huge.grad = huge.grad * 1000.0
    before = [p.grad.clone() for p in params]

    model._trainer = stub_trainer(current_epoch=1)
    model.on_before_optimizer_step(torch.optim.SGD(params, lr=0.1))

    for param, grad in zip(params, before):
        if param is huge:
            torch.testing.assert_close(param.grad, grad * 3.0 / (grad.norm() + 1e-6))
            assert float(param.grad.norm()) == pytest.approx(3.0, rel=1e-5)
        else:
            assert torch.equal(param.grad, grad)


# --- MAE ---------------------------------------------------------------------------------------------------


def tiny_mae(**kwargs: Any) -> MAE:
    torch.manual_seed(0)
    encoder = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    args = dict(backbone="mae_vit_tiny", backbone_kwargs=encoder, decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    return MAE(**{**args, **kwargs})


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_encodes_visible_patches_only_and_regresses_masked_ones_only(
    norm_pix_loss: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """He et al. 2022: per-sample uniform noise, the 25% patches with the smallest noise kept; the encoder runs on
    the visible patches (with their positions) plus the class token; the decoder restores the order; the loss is
    the MSE per patch averaged over the masked patches (targets normalized per patch with ``norm_pix_loss``).
    Changing masked pixels leaves the encoder's output unchanged; visible patches get no gradient from the loss."""
    model = tiny_mae(norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
    seeded_task(model, monkeypatch, "_generator")
    decoded = capture_output(model.decoder)
    images = fixed_views(4, 16, num_views=1)["views"][0]
    out = step(model, [images])
    out["loss"].backward()

    b, n, p = 4, 16, 4
    ids_shuffle = torch.rand(b, n, generator=task_generator()).argsort(dim=1)
    keep = ids_shuffle[:, : n // 4]
    hidden = torch.ones(b, n).scatter_(1, keep, 0.0)
    backbone = model.backbone
    tokens = backbone.patch_embed(images).flatten(2).transpose(1, 2) + backbone.pos_embed[:, 1:]
    latent = backbone.encode(torch.stack([tokens[i, keep[i]] for i in range(b)]))
    prediction = model.decoder(latent, ids_shuffle.argsort(dim=1))
    target = patchify(images, p)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = (((prediction - target) ** 2).mean(-1) * hidden).sum() / hidden.sum()
    torch.testing.assert_close(out["loss"], expected, **CLOSE)
    torch.testing.assert_close(out["features"], latent[:, 0].detach(), **CLOSE)
    assert_same_gradients(expected, trainable(model))

    grad = decoded[0].grad.abs().sum(-1)  # (B, N): the loss's gradient on each predicted patch
    assert (grad[hidden == 0] == 0).all() and (grad[hidden == 1] > 0).all()

    hidden_pixels = unpatchify(hidden[..., None].expand(-1, -1, p * p * 3), p).bool()
    other_masked = images + 5.0 * torch.randn(images.shape) * hidden_pixels
    other_visible = images + 5.0 * torch.randn(images.shape) * ~hidden_pixels
    with torch.no_grad():
        masked_changed, visible_changed = step(model, [other_masked]), step(model, [other_visible])
    torch.testing.assert_close(masked_changed["features"], out["features"], rtol=0, atol=1e-6)
    assert not torch.allclose(masked_changed["loss"], out["loss"])  # the targets did change
    assert not torch.allclose(visible_changed["features"], out["features"], atol=1e-3)


# --- MLM ---------------------------------------------------------------------------------------------------


def test_mlm_loss_is_cross_entropy_at_the_chosen_positions_only() -> None:
    """Devlin et al. 2019: the encoder reads the corrupted sequence ([MASK], random and kept tokens at the
    chosen positions; padding out of attention); the tied output layer predicts the original token at the chosen
    positions only, and the other positions get no gradient from the loss."""
    torch.manual_seed(0)
    vocab, mask_id, pad_id = 40, 3, 0
    model = MaskedLanguageModel(vocab_size=vocab, dim=16, depth=2, num_heads=2, dropout=0.0)
    ids = torch.randint(4, vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[2, 8:] = 1, pad_id  # [CLS] first; the last row padded
    chosen = [(0, 2, mask_id), (0, 5, 17), (1, 1, None), (1, 7, mask_id), (2, 3, mask_id)]  # None: token kept
    labels, corrupted = torch.full_like(ids, -100), ids.clone()
    for row, position, replacement in chosen:
        labels[row, position] = ids[row, position]
        if replacement is not None:
            corrupted[row, position] = replacement
    attention = ids != pad_id
    hidden_states = capture_output(model.encoder)
    loss, _ = run_training_step(model, {"input_ids": corrupted, "attention_mask": attention, "labels": labels})
    loss.backward()

    x = model.embed_norm(model.token_embed(corrupted) + model.pos_embed(torch.arange(10)))
    logits = model.head_transform(model.encoder(x, src_key_padding_mask=~attention)) @ model.token_embed.weight.T
    logits = logits + model.output_bias
    terms = [-F.log_softmax(logits[row, position], dim=-1)[ids[row, position]] for row, position, _ in chosen]
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(loss, expected, **CLOSE)
    assert_same_gradients(expected, trainable(model))
    grad = hidden_states[0].grad.abs().sum(-1)
    is_chosen = labels != -100
    assert (grad[~is_chosen] == 0).all() and (grad[is_chosen] > 0).all()


# --- Pretext tasks -----------------------------------------------------------------------------------------


def test_rotation_classifies_all_four_rotations_of_every_image() -> None:
    """Gidaris et al. 2018: each image in all 4 rotations by k quarter turns counter-clockwise, label k. The
    reference interleaves the rotations per image (a BatchNorm batch's statistics do not depend on its order)."""
    torch.manual_seed(0)
    model = Rotation(**BACKBONE)
    view = fixed_views(4, 16, num_views=1)["views"][0]
    out = step(model, [view])
    out["loss"].backward()

    def counter_clockwise(image: torch.Tensor, quarter_turns: int) -> torch.Tensor:
        for _ in range(quarter_turns):  # (r, c) <- (c, S - 1 - r): one turn counter-clockwise
            image = image.transpose(-2, -1).flip(-2)
        return image

    rotated = torch.stack([counter_clockwise(view[i], k) for i in range(4) for k in range(4)])
    labels = torch.tensor([k for _ in range(4) for k in range(4)])
    expected = F.cross_entropy(model.head(model.backbone(rotated)), labels)
    torch.testing.assert_close(out["loss"], expected, **CLOSE)
    assert_same_gradients(expected, trainable(model))


def test_jigsaw_names_the_permutation_of_the_fixed_set_that_shuffled_the_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noroozi and Favaro 2016: a 3x3 grid of cells, one tile at a random offset in each (after a random grid
    origin), each tile normalized; tile ``perm[i]`` is placed at position ``i`` for ``perm`` the drawn row of the
    fixed maximal-Hamming set; the classifier on the concatenated tile features predicts the row's index."""
    torch.manual_seed(0)
    num_permutations, size, b = 10, 16, 4
    model = Jigsaw(**BACKBONE, head_hidden_dim=32, num_permutations=num_permutations)
    seeded_task(model, monkeypatch, "task_generator")
    view = fixed_views(b, size, num_views=1)["views"][0]
    out = step(model, [view])
    out["loss"].backward()

    permutations = maximal_hamming_permutations(num_permutations, 9, seed=0)
    assert torch.equal(model.permutations, permutations)
    cell = size // 3
    tile = int(cell * 64 / 75)
    g = task_generator()  # the step's draws, in its order: grid origin and tile offsets, then the labels
    u = torch.rand(b, 10, 2, generator=g)
    labels = torch.randint(num_permutations, (b,), generator=g)
    puzzles = []
    for s in range(b):
        origin = [int(u[s, 0, d] * (size - 3 * cell + 1)) for d in (0, 1)]
        tiles = []
        for t in range(9):
            top = origin[0] + int(u[s, 1 + t, 0] * (cell - tile + 1)) + (t // 3) * cell
            left = origin[1] + int(u[s, 1 + t, 1] * (cell - tile + 1)) + (t % 3) * cell
            piece = view[s, :, top : top + tile, left : left + tile]
            tiles.append((piece - piece.mean()) / (piece.std(unbiased=False) + 1e-5))
        puzzles += [tiles[int(source)] for source in permutations[labels[s]]]
    features = model.backbone(torch.stack(puzzles)).view(b, -1)
    expected = F.cross_entropy(model.head(features), labels)
    torch.testing.assert_close(out["loss"], expected, **CLOSE)
    assert_same_gradients(expected, trainable(model))


def lab_images(b: int, size: int, flip_ab: bool) -> torch.Tensor:
    """Normalized RGB views of fixed in-gamut Lab images; ``flip_ab`` negates the colour, keeping the lightness."""
    g = torch.Generator().manual_seed(0)
    lightness = 35 + 30 * torch.rand(b, 1, size, size, generator=g)
    ab = 24 * torch.rand(b, 2, size, size, generator=g) - 12
    rgb = lab_to_rgb(torch.cat([lightness, -ab if flip_ab else ab], dim=1), clip=False)
    assert rgb.min() > 0 and rgb.max() < 1  # in gamut: the lightness survives the round trip
    return (rgb - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


def test_colorization_predicts_ab_from_the_lightness_alone() -> None:
    """Zhang et al. 2016: the backbone sees L only (L / 50 - 1 in 3 channels); the decoder regresses ab / 110 with
    smooth-L1 (beta 5 / 110). Two images with the same lightness and opposite colours get the same prediction."""
    torch.manual_seed(0)
    model = Colorization(**BACKBONE)
    predictions = capture_output(model.decoder)
    view = lab_images(4, 16, flip_ab=False)
    out = step(model, [view])
    out["loss"].backward()

    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    lab = rgb_to_lab((view * std + mean).clamp(0, 1))
    lightness = (lab[:, :1] / 50 - 1).expand(-1, 3, -1, -1)
    prediction = model.decoder(model.backbone.feature_map(lightness), size=(16, 16))
    error, beta = (prediction - lab[:, 1:] / 110).abs(), 5 / 110
    expected = torch.where(error < beta, 0.5 * error**2 / beta, error - 0.5 * beta).mean()
    torch.testing.assert_close(out["loss"], expected, **CLOSE)
    assert_same_gradients(expected, trainable(model))

    with torch.no_grad():
        flipped = step(model, [lab_images(4, 16, flip_ab=True)])
    # captured: the step's prediction, the reference's, the flipped colours'
    torch.testing.assert_close(predictions[2], predictions[0].detach(), rtol=0, atol=1e-4)
    assert not torch.allclose(flipped["loss"], out["loss"])  # the targets did change


def boxes_mask(b: int, size: int, side: int, corners: Callable[[int], list[tuple[int, int]]]) -> torch.Tensor:
    hole = torch.zeros(b, 1, size, size, dtype=torch.bool)
    for s in range(b):
        for top, left in corners(s):
            hole[s, :, top : top + side, left : left + side] = True
    return hole


@pytest.mark.parametrize("mask", ["center", "random_boxes"])
def test_inpainting_reconstructs_the_hidden_region_from_its_surroundings(mask: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pathak et al. 2016, eq. 1: the backbone encodes the view with the hole filled with 0 (the mean colour); the
    decoder's reconstruction is compared with the view by L2 over the hidden pixels only. Pixels outside the hole
    get no gradient, and what lies inside the hole does not change the reconstruction."""
    torch.manual_seed(0)
    b, size = 4, 16
    model = Inpainting(**BACKBONE, mask=mask, hole_fraction=0.25 if mask == "random_boxes" else 0.5, num_boxes=2)
    seeded_task(model, monkeypatch, "task_generator")
    reconstructions = capture_output(model.decoder)
    view = fixed_views(b, size, num_views=1)["views"][0]
    out = step(model, [view])
    out["loss"].backward()

    if mask == "center":
        hole = boxes_mask(b, size, 8, lambda s: [(4, 4)])
    else:
        u = torch.rand(b, 2, 2, generator=task_generator())
        hole = boxes_mask(b, size, 4, lambda s: [(int(u[s, k, 0] * 13), int(u[s, k, 1] * 13)) for k in range(2)])
    reconstruction = model.decoder(model.backbone.feature_map(view * ~hole), size=(size, size))
    expected = ((reconstruction - view) ** 2 * hole).sum() / (3 * hole.sum())
    torch.testing.assert_close(out["loss"], expected, **CLOSE)
    assert_same_gradients(expected, trainable(model))
    grad = reconstructions[0].grad.abs().sum(1, keepdim=True)
    assert (grad[~hole] == 0).all() and (grad[hole] > 0).all()

    with torch.no_grad():
        other = step(model, [view + 3.0 * torch.randn(view.shape) * hole])
    # the first captured output is the step's, the second the reference's, the third the changed view's
    torch.testing.assert_close(reconstructions[2], reconstructions[0].detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(other["loss"], out["loss"])
