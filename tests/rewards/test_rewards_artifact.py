"""The learned artifact reward (data generation, training, loading) and the no-weights NSS quality score."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage, special

from visalign import rewards
from visalign.rewards.artifact import (
    ARTIFACT_KINDS,
    ArtifactNet,
    ArtifactReward,
    load_image_folder,
    save_artifact_model,
    train_artifact,
)
from visalign.rewards.quality import (
    NSSQuality,
    aggd_fit,
    brisque_features,
    dead_leaves,
    fit_pristine,
    ggd_fit,
    save_pristine,
)
from visalign.world.artifacts import corrupt, make_artifact_set, write_artifact_set
from visalign.world.grammar import sample_specs
from visalign.world.render import BACKGROUND, render_batch

# ------------------------------------------------------------------------------------ artifact data


def test_generated_set_labels_and_corruptions():
    images, is_artifact, labels = make_artifact_set(6, 30, seed=3)
    renders = render_batch(sample_specs(36, generator=3), 3)
    assert images.shape == (36, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images[:6], renders[:6])  # clean images are the untouched renders
    assert is_artifact.tolist() == [0.0] * 6 + [1.0] * 30
    assert labels[:6].sum() == 0 and ((labels[6:].sum(dim=1) >= 1) & (labels[6:].sum(dim=1) <= 2)).all()
    changed = (images[6:] - renders[6:]).abs().amax(dim=(1, 2, 3))
    assert (changed > 0.02).all()  # every corruption is visible


def test_broken_shape_removes_part_of_an_object():
    render = render_batch(sample_specs(1, templates=("single",), generator=1), 1)[0]
    background = torch.tensor(BACKGROUND)[:, None, None]
    foreground = (render - background).abs().amax(dim=0) > 0.15
    for seed in range(5):
        broken = corrupt(render, ("broken_shape",), np.random.default_rng(seed))
        removed = foreground & ((broken - background).abs().amax(dim=0) < 1e-6)
        assert removed.sum() >= 0.15 * foreground.sum()
        rows, cols = foreground.nonzero().T
        box = torch.zeros_like(foreground)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert ((broken - render).abs().amax(dim=0) > 0)[~box].sum() == 0  # only the object's box changed
    with pytest.raises(ValueError, match="'smudge' is not one of"):
        corrupt(render, ("smudge",), np.random.default_rng(0))


def test_write_and_load_png_folders(tmp_path):
    clean_dir, artifact_dir = write_artifact_set(tmp_path, num_clean=3, num_artifact=4, seed=0)
    clean, _ = load_image_folder(clean_dir)
    artifact, names = load_image_folder(artifact_dir)
    assert clean.shape == (3, 3, 32, 32) and artifact.shape == (4, 3, 32, 32)
    labels = json.loads((artifact_dir / "labels.json").read_text())
    assert sorted(labels) == names and all(set(v) <= set(ARTIFACT_KINDS) and v for v in labels.values())
    images, _, _ = make_artifact_set(3, 4, seed=0)
    torch.testing.assert_close(clean, images[:3], atol=0.501 / 255, rtol=0)  # 8-bit PNG round trip
    Image.new("RGB", (16, 16)).save(clean_dir / "odd.png")
    with pytest.raises(ValueError, match="different sizes"):
        load_image_folder(clean_dir)


# ------------------------------------------------------------------------------------ artifact reward


def test_tiny_reward_contract_gradients_and_geometry():
    reward = ArtifactReward.tiny()
    images = torch.rand(2, 3, 24, 40, requires_grad=True)  # non-square: squashed to the model's 16×16
    out = reward(images=images)
    assert set(out) == {"score", *ARTIFACT_KINDS}
    assert all(((v >= 0) & (v <= 1)).all() for v in out.values())
    with torch.no_grad():
        resized = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        logits = reward.model(resized)
    torch.testing.assert_close(out["score"], torch.sigmoid(-logits[:, 0]))
    torch.testing.assert_close(out["noise"], 1 - torch.sigmoid(logits[:, 2]))
    out["score"].sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_checkpoint_round_trip_registry_and_key_errors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = ArtifactReward.tiny(seed=1).model
    save_artifact_model(model, tmp_path / "artifact.safetensors", {"accuracy": 0.5})
    loaded = rewards.load("artifact", weights=str(tmp_path / "artifact.safetensors"))
    images = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(loaded(images=images)["score"], ArtifactReward(model=model)(images=images)["score"])
    with safe_open(str(tmp_path / "artifact.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    assert json.loads(metadata["metrics"]) == {"accuracy": 0.5}
    state.pop("head.bias")
    save_file(state, str(tmp_path / "broken.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"missing keys: head.bias"):
        ArtifactReward(weights=tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="pass weights=PATH"):
        ArtifactReward()
    with pytest.raises(FileNotFoundError, match="train them with train_artifact"):
        ArtifactReward(weights=tmp_path / "nothing.safetensors")


def test_train_without_labels_and_bad_labels(tmp_path):
    clean_dir, artifact_dir = write_artifact_set(tmp_path / "data", num_clean=12, num_artifact=12, seed=1)
    (artifact_dir / "labels.json").unlink()
    metrics = train_artifact(clean_dir, artifact_dir, tmp_path / "plain.safetensors", epochs=1, progress=False,
                             val_fraction=0.25)
    assert metrics["val_images"] == 6 and "accuracy/blur" not in metrics
    out = ArtifactReward(weights=tmp_path / "plain.safetensors")(images=torch.rand(2, 3, 32, 32))
    assert set(out) == {"score"}
    (tmp_path / "labels.json").write_text(json.dumps({"missing.png": ["blur"]}))
    with pytest.raises(ValueError, match="not in the artifact folder"):
        train_artifact(clean_dir, artifact_dir, tmp_path / "x.safetensors", labels=tmp_path / "labels.json",
                       epochs=1, progress=False)


def test_artifact_reward_trains_to_95_percent_held_out(tmp_path):
    """Acceptance: trained on a generated world set (1 CPU thread, ~15 s), >= 95% on held-out images."""
    clean_dir, artifact_dir = write_artifact_set(tmp_path / "data", num_clean=1500, num_artifact=1500, seed=0)
    metrics = train_artifact(clean_dir, artifact_dir, tmp_path / "artifact.safetensors", progress=False)
    assert metrics["accuracy"] >= 0.95, metrics  # the 20% held out of the folders
    # A fresh set from other seeds, scored through the reward.
    images, is_artifact, labels = make_artifact_set(300, 300, seed=99)
    out = ArtifactReward(weights=tmp_path / "artifact.safetensors")(images=images)
    accuracy = ((out["score"] < 0.5).float() == is_artifact).float().mean().item()
    assert accuracy >= 0.95, accuracy
    blurred_only = (labels[:, 0] == 1) & (labels.sum(dim=1) == 1)
    assert out["blur"][blurred_only].mean() < 0.3 < out["blur"][:300].mean()


# ------------------------------------------------------------------------------------ NSS quality


def brisque_reference(image: torch.Tensor) -> np.ndarray:
    """brisque_feature.m in numpy/scipy: rgb2gray on 0-255, filter2 'same' (zero padding), nearest entry of the
    alpha table 0.2:0.001:10, circshift pairs. The half-size image: torch's antialiased bicubic in float64,
    checked against PIL's (float32) to 1e-4; float32 rounding alone flips the sign of near-zero MSCN products
    on flat regions and moves the AGGD fits by ~5e-3, so the comparison uses the same float64 resize."""
    rgb = image.double().numpy() * 255
    luma = 0.298936021293775 * rgb[0] + 0.587043074451121 * rgb[1] + 0.114020904255103 * rgb[2]
    x = np.arange(7) - 3
    window = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    window /= window.sum()
    gam = np.arange(0.2, 10.0005, 0.001)
    r_ggd = special.gamma(1 / gam) * special.gamma(3 / gam) / special.gamma(2 / gam) ** 2
    r_aggd = special.gamma(2 / gam) ** 2 / (special.gamma(1 / gam) * special.gamma(3 / gam))
    feats = []
    for _scale in range(2):
        mu = ndimage.correlate(luma, window, mode="constant")
        sigma = np.sqrt(np.abs(ndimage.correlate(luma * luma, window, mode="constant") - mu * mu))
        structdis = (luma - mu) / (sigma + 1)
        vec = structdis.ravel()
        rho = np.mean(vec**2) / np.mean(np.abs(vec)) ** 2
        feats += [gam[np.argmin(np.abs(rho - r_ggd))], np.mean(vec**2)]
        for shift in [(0, 1), (1, 0), (1, 1), (-1, 1)]:
            pair = (structdis * np.roll(structdis, shift, axis=(0, 1))).ravel()
            left, right = np.sqrt(np.mean(pair[pair < 0] ** 2)), np.sqrt(np.mean(pair[pair > 0] ** 2))
            gammahat = left / right
            rhat = np.mean(np.abs(pair)) ** 2 / np.mean(pair**2)
            rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
            alpha = gam[np.argmin((r_aggd - rhatnorm) ** 2)]
            const = np.sqrt(special.gamma(1 / alpha)) / np.sqrt(special.gamma(3 / alpha))
            mean = (right - left) * special.gamma(2 / alpha) / special.gamma(1 / alpha) * const
            feats += [alpha, mean, left**2, right**2]
        size = ((luma.shape[0] + 1) // 2, (luma.shape[1] + 1) // 2)
        pil = np.asarray(Image.fromarray(luma.astype(np.float32), mode="F").resize(size[::-1], Image.BICUBIC))
        luma = F.interpolate(torch.from_numpy(luma)[None, None], size=size, mode="bicubic", align_corners=False,
                             antialias=True)[0, 0].numpy()
        np.testing.assert_allclose(luma, pil, atol=1e-4)
    return np.array(feats)


def test_brisque_features_match_the_reference_procedure():
    render = render_batch(sample_specs(1, generator=2), 2)
    noisy = (render + 0.03 * torch.randn(render.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for image in (dead_leaves(1, size=40, seed=5)[0, :, :, :33], noisy[0]):  # odd width: ceil at the half size
        feats = brisque_features(image[None])[0].numpy()
        ref = brisque_reference(image)
        alphas = np.r_[[0], np.arange(2, 18, 4)]
        alphas = np.r_[alphas, alphas + 18]
        # Shapes: interpolated in the table vs its nearest entry (step 0.001).
        np.testing.assert_allclose(feats[alphas], ref[alphas], atol=1e-3)
        means = np.r_[np.arange(3, 18, 4), np.arange(3, 18, 4) + 18]
        np.testing.assert_allclose(feats[means], ref[means], rtol=5e-3, atol=1e-5)  # depend on the shape
        variances = np.setdiff1d(np.arange(36), np.r_[alphas, means])
        np.testing.assert_allclose(feats[variances], ref[variances], rtol=1e-4)


def test_ggd_and_aggd_fits_recover_known_shapes():
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(1, 200_000, generator=generator, dtype=torch.float64)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1, 200_000)).double()
    assert abs(ggd_fit(gaussian)[0].item() - 2.0) < 0.05
    assert abs(ggd_fit(laplace)[0].item() - 1.0) < 0.05
    # An AGGD with alpha = 2, sigma_l = 1, sigma_r = 2 puts mass sigma_l / (sigma_l + sigma_r) = 1/3 left of 0.
    left = torch.rand(1, 200_000, generator=generator, dtype=torch.float64) < 1 / 3
    asymmetric = torch.where(left, -gaussian.abs(), 2 * gaussian.abs())
    alpha, mean, left_var, right_var = aggd_fit(asymmetric)
    assert abs(alpha.item() - 2.0) < 0.05 and abs(left_var.item() - 1.0) < 0.02 and abs(right_var.item() - 4.0) < 0.1
    # eta = (beta_r - beta_l) Gamma(2/a)/Gamma(1/a) with beta = std sqrt(2) at a = 2: (2 - 1) sqrt(2) / sqrt(pi).
    assert abs(mean.item() - np.sqrt(2 / np.pi)) < 0.02


def blur(images, sigma):
    return images if sigma == 0 else TF.gaussian_blur(images, 2 * int(3 * sigma) + 1, sigma)


def noise(images, std):
    return (images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


def test_nss_quality_falls_monotonically_with_blur_and_noise():
    reward = rewards.load("quality-nss")
    images = dead_leaves(6, size=96, seed=1)  # held out from the built-in pristine model (seed 0)
    by_blur = torch.stack([reward(images=blur(images, s))["score"] for s in (0, 0.5, 1.0, 1.5, 2.0)])
    by_noise = torch.stack([reward(images=noise(images, s))["score"] for s in (0, 0.01, 0.02, 0.05, 0.1)])
    assert (by_blur.diff(dim=0) < 0).all(), by_blur
    assert (by_noise.diff(dim=0) < 0).all(), by_noise


def test_nss_quality_with_a_pristine_model_of_world_renders(tmp_path):
    model = fit_pristine(render_batch(sample_specs(64, generator=1), 1))
    save_pristine(model, tmp_path / "world.safetensors")
    reward = NSSQuality(pristine=tmp_path / "world.safetensors")
    renders = render_batch(sample_specs(8, generator=0), 0)
    by_blur = [reward(images=blur(renders, s))["score"].mean().item() for s in (0, 0.5, 1.0)]
    by_noise = [reward(images=noise(renders, s))["score"].mean().item() for s in (0, 0.02, 0.05, 0.1)]
    assert by_blur == sorted(by_blur, reverse=True) and by_noise == sorted(by_noise, reverse=True)
    out = reward(images=renders)
    torch.testing.assert_close(out["score"], -out["distance"])
    with pytest.raises(ValueError, match=r"must be \[36\] and \[36, 36\]"):
        NSSQuality(pristine={"mean": torch.zeros(3), "covariance": torch.eye(3)})
    with pytest.raises(KeyError, match="lacks \\['covariance'\\]"):
        NSSQuality(pristine={"mean": torch.zeros(36)})


def test_nss_quality_is_differentiable():
    images = dead_leaves(2, size=48, seed=2).requires_grad_(True)
    NSSQuality()(images=images)["score"].sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    flat = torch.full((1, 3, 32, 32), 0.5, requires_grad=True)  # zero variance everywhere
    NSSQuality()(images=flat)["score"].sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_artifact_net_is_fully_convolutional():
    net = ArtifactNet(ArtifactReward.tiny().model.config)
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 1 + len(ARTIFACT_KINDS))
