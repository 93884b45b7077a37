"""The model families table: options checked before any weights load, pipelines wrapped in their family's
adapter, every family listed with its tiny builds."""

import pytest

from visalign.models import FAMILIES, MODELS, adapter_for, load_model, model_options
from visalign.trainers import load_train_config


def test_options_are_the_adapters_keywords_and_are_checked_before_loading(monkeypatch, tmp_path):
    assert model_options("wan22") == ["max_sequence_length", "experts", "guidance_scale_2"]
    assert model_options("world") is None  # a factory of its own: checked when it runs
    import visalign.models as models

    monkeypatch.setitem(MODELS, "tiny-wan22-a14b", MODELS["tiny-wan22-a14b"])  # restored after the test
    loaded = []
    monkeypatch.setattr(models, "import_target", lambda t, real=models.import_target: loaded.append(t) or real(t))
    with pytest.raises(ValueError, match=r"model.options: tiny-wan22-a14b takes no option 'expert' \(did you mean "
                                         r"'experts'\?\); its options: max_sequence_length, experts"):
        load_train_config(None, ["model.name=tiny-wan22-a14b", "model.options={expert: low}", "model.height=16",
                                 "model.width=16", "model.num_frames=5", f"run.out_dir={tmp_path}"])
    assert not any("tiny_wan22" in t for t in loaded)  # the builder was never imported, let alone run
    with pytest.raises(ValueError, match="options: tiny-sd3 takes no option 'cfg_truncation'"):
        load_model("tiny-sd3", cfg_truncation=0.5)


def test_options_reach_the_adapter(tiny_run):
    cfg = tiny_run("model.options={experts: low, guidance_scale_2: 2.5}", "model.height=16", "model.width=16",
                   "model.num_frames=5", model="tiny-wan22-a14b")
    adapter = load_model(cfg.model.name, **cfg.model.options)
    assert adapter.trained == ("transformer_2",) and adapter.guidance_scale_2 == 2.5
    assert load_model("tiny-sd3", max_sequence_length=16).max_sequence_length == 16


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.pipelines], ids=lambda f: f.name)
def test_each_pipeline_is_wrapped_in_its_familys_adapter(family):
    tiny = load_model(next(iter(family.tiny)))
    # the tiny text encoder has 3 layers, not FLUX.2 klein's 36
    wrapped = adapter_for(tiny.pipe, **({"text_encoder_out_layers": (1, 2, 3)} if family.name == "flux2-klein" else {}))
    assert type(wrapped) is type(tiny) and wrapped.pipe is tiny.pipe and wrapped.name == tiny.name
    request = (32, 32, 5) if tiny.is_video else (32, 32, None)
    assert wrapped.latent_shape(*request) == tiny.latent_shape(*request)


def test_every_family_lists_its_tiny_builds_and_hub_ids():
    for f in FAMILIES:
        assert f.hub and all("/" in h for h in f.hub) and f.tiny and f.notes
        assert f.name in MODELS and all(t in MODELS and t.startswith("tiny-") for t in f.tiny)


@pytest.mark.parametrize("name", [t for f in FAMILIES for t in f.tiny])
def test_visalign_sample_writes_an_image_or_clip_for_every_tiny_model(name, tmp_path):
    from PIL import Image

    from visalign.cli import main
    from visalign.models import request_rules

    rules = request_rules(name)
    size = max(16, rules.multiple)
    out = tmp_path / ("s.gif" if rules.video else "s.png")
    args = ["sample", "--model", name, "--prompt", "a red circle", "--height", str(size), "--width", str(size),
            "--steps", "2", "--out", str(out)]
    if rules.video:
        args += ["--num-frames", "5"]
    if rules.edits:
        Image.new("RGB", (size, size), (200, 30, 30)).save(tmp_path / "src.png")
        args += ["--source-image", str(tmp_path / "src.png")]
    assert main(args) == 0
    with Image.open(out) as image:
        assert getattr(image, "n_frames", 1) == (5 if rules.video else 1)
