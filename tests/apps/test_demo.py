"""The Gradio demo, served on 127.0.0.1 and driven through gradio_client (compare, generate, score, run view),
its input validation, and a headless-Chromium page load that runs one comparison and saves a screenshot."""

import json

import gradio_client
import numpy as np
import pytest
import torch
from PIL import Image

from visalign import rewards
from visalign.demo.app import DemoConfig, concept_text, launch, wait_idle
from visalign.demo.screenshot import screenshot
from visalign.world.model import WorldAdapter

PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    aligned = root / "aligned.safetensors"
    WorldAdapter.random(1).save_pretrained(aligned)  # a different model in the "aligned" column
    run = root / "runs" / "nft"
    (run / "samples").mkdir(parents=True)
    rows = [{"step": s, "rewards/world-verifier/mean": 0.5 + 0.05 * s, "eval/world-strict/mean": 0.5 - 0.04 * s}
            for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(run / "samples" / "step_000002.png")
    (run / "alarms.jsonl").write_text(json.dumps({"message": "reward-hacking alarm at step 3"}) + "\n")
    cfg = DemoConfig(checkpoints={"aligned": str(aligned)}, runs_dir=str(root / "runs"),
                     rewards=["world-verifier", "saturation"])
    app, url = launch(cfg, block=False)
    client = gradio_client.Client(url, verbose=False)
    yield client, url, root
    wait_idle(app)
    app.close()


def load(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_compare_returns_images_and_their_scores(served):
    client, _, _ = served
    gallery, slider, table, _bars, winners, _lineage, x0, ess = client.predict(
        PROMPT, 5, 6, 3.0, 32, 2, ["aligned"], "fk", 2, 10.0, ["world-verifier", "saturation"], api_name="/compare")
    captions = [g["caption"] for g in gallery]
    assert captions == ["base · seed 5", "base · seed 6", "aligned · seed 5", "aligned · seed 6",
                        "steered (fk) · seed 5", "steered (fk) · seed 6"]
    # Images are shown at 4x with nearest-neighbour: undo it and score them again; the table holds those scores.
    images = torch.stack([load(g["image"])[:, ::4, ::4] for g in gallery])
    assert images.shape == (6, 3, 32, 32)
    sat = rewards.load("saturation")(images=images)
    verifier = rewards.load("world-verifier")(prompts=[PROMPT] * 6, images=images)["score"]
    rows = table["data"]
    headers = table["headers"]
    assert [r[headers.index("column")] for r in rows] == ["base", "base", "aligned", "aligned", "steered (fk)",
                                                          "steered (fk)"]
    np.testing.assert_allclose([r[headers.index("saturation")] for r in rows], sat.numpy(), atol=1e-4)
    np.testing.assert_allclose([r[headers.index("world-verifier")] for r in rows], verifier.numpy(), atol=1e-4)
    assert all("relation" in r[headers.index("concepts")] for r in rows)
    # The base and aligned models differ; the winner of each reward has the highest column mean.
    assert not torch.equal(images[0], images[2])
    means = {}
    for r in rows:
        means.setdefault(r[0], []).append(r[headers.index("saturation")])
    best = max(means, key=lambda c: sum(means[c]) / 2)
    assert {w[0]: w[1] for w in winners["data"]}["saturation"] == best
    assert len(ess["data"]) > 0 and len(x0) > 0 and len(slider) == 2
    # the slider shows base against the aligned checkpoint (not the last, steered, column)
    right = load(slider[1] if isinstance(slider[1], str) else slider[1]["path"])[:, ::4, ::4]
    assert torch.equal(right, images[2])


def test_generate_matches_the_base_column_and_score_an_upload(served, tmp_path):
    client, _, _ = served
    gallery = client.predict(PROMPT, 5, 6, 3.0, 32, 2, api_name="/generate")
    compared = client.predict(PROMPT, 5, 6, 3.0, 32, 2, [], "none", 2, 10.0, ["saturation"], api_name="/compare")[0]
    assert torch.equal(load(gallery[0]["image"]), load(compared[0]["image"]))
    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(path)
    scores = client.predict(gradio_client.handle_file(str(path)), "a red circle", ["saturation"], api_name="/score")
    assert scores["data"] == [["saturation", 1.0]]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_a_huge_image_is_refused_before_it_is_decoded(served, tmp_path):
    client, _, _ = served
    path = tmp_path / "huge.png"
    Image.new("L", (6000, 6000), 0).save(path, optimize=True)  # ~35 KB on disk, 36 M pixels decoded
    assert path.stat().st_size < 200_000
    before = _rss_mb()
    with pytest.raises(Exception, match=r"6000 x 6000 = 36,000,000 pixels; at most 1,048,576"):
        client.predict(gradio_client.handle_file(str(path)), "a red circle", ["saturation"], api_name="/score")
    assert _rss_mb() - before < 200  # the server runs in this process
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(Exception, match="not an image this demo can read"):
        client.predict(gradio_client.handle_file(str(text)), "a red circle", ["saturation"], api_name="/score")
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict(gradio_client.handle_file(str(text.rename(tmp_path / "notes.txt"))), "a red circle",
                       ["saturation"], api_name="/score")


@pytest.mark.parametrize("args, message", [
    (("", 0, 6, 3.0, 32, 1), "enter a prompt"),
    (("a purple circle", 0, 6, 3.0, 32, 1), "cannot read this prompt: words outside the world's vocabulary: "
                                            "purple"),
    (("two " * 400, 0, 6, 3.0, 32, 1), "the prompt has 1599 characters; at most 500"),
    ((PROMPT, 2**63, 6, 3.0, 32, 1), "seed must be a whole number between 0 and 2147483647"),
    ((PROMPT, -1, 6, 3.0, 32, 2), "seed must be a whole number between 0 and 2147483646"),
    ((PROMPT, 0, 500, 3.0, 32, 1), "steps must be between|greater than maximum value 50"),
    ((PROMPT, 0, 6, 3.0, 64, 1), "32"),
    ((PROMPT, 0, 6, 3.0, 32, 99), "samples must be between|greater than maximum value 8"),
])
def test_bad_input_is_a_clear_error(served, args, message):
    client, _, _ = served
    with pytest.raises(Exception, match=message):
        client.predict(*args, api_name="/generate")


def test_concurrent_steered_requests_keep_their_own_counts(tmp_path):
    # Eight FK requests with different particle counts, four served at once on one shared model: every one
    # succeeds, and its NFE is its own (k particles x steps), not a mix of the overlapping requests'.
    from concurrent.futures import ThreadPoolExecutor

    from visalign.demo.app import Demo

    demo = Demo(DemoConfig(rewards=["world-verifier"]))
    ks = [1, 2, 3, 4, 1, 2, 3, 4]
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda k: demo.steered(PROMPT, 0, 5, 3.0, 32, 1, "fk", k, 10.0)[1], ks))
    assert [r["nfe"] for r in reports] == [k * 5 * 2 for k in ks]  # CFG: two branches per sample
    assert "predict_velocity" not in vars(demo.base)  # the shared adapter was never patched


def test_run_view_and_file_access(served):
    client, _, root = served
    curves, grids, alarm = client.predict("nft", api_name="/run_view")
    assert alarm == "reward-hacking alarm at step 3" and len(grids) == 1 and curves is not None
    with pytest.raises(Exception, match="not in the list of choices"):  # the page offers only runs under --runs
        client.predict("../../etc", api_name="/run_view")
    from visalign.demo.app import Demo, DemoError

    demo = Demo(DemoConfig(runs_dir=str(root / "runs")))
    assert demo.runs() == ["nft"]
    with pytest.raises(DemoError, match="inside the configured runs directory"):
        demo.run_dir("../../etc")
    with pytest.raises(ValueError, match="no such file"):
        DemoConfig(checkpoints={"x": "/nonexistent.safetensors"})


def test_concept_verdicts_read_one_group_per_object():
    verdicts = {"red circle/object": True, "red circle/color": False, "blue square/object": True,
                "blue square/count": True, "relation": False, "no_extra": True}
    assert concept_text(verdicts) == ("red circle: object ✓ color ✗; blue square: object ✓ count ✓; relation ✗; "
                                      "no_extra ✓")


@pytest.mark.browser
def test_browser_loads_the_page_and_runs_a_comparison(tmp_path):
    pytest.importorskip("playwright")
    app, url = launch(DemoConfig(rewards=["world-verifier", "saturation"]), block=False)
    try:
        # waits for the score table and the gallery, then for the FK tab's ESS rows and particle images
        out = screenshot(url, tmp_path / "page.png", fk_out=tmp_path / "fk.png")
    finally:
        assert wait_idle(app)
        app.close()
    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    _check_compare_page(img)
    _check_compare_page(np.asarray(Image.open(tmp_path / "fk.png").convert("RGB")).astype(float))  # x0 images


@pytest.mark.browser
def test_browser_shows_a_bad_prompt_as_a_message_next_to_the_inputs(tmp_path, capfd):
    pytest.importorskip("playwright")
    from visalign.demo.screenshot import bad_prompt

    app, url = launch(DemoConfig(rewards=["world-verifier", "saturation"]), block=False)
    try:
        text = bad_prompt(url, "a purple hexagon", tmp_path / "bad.png")
    finally:
        assert wait_idle(app)
        app.close()
    assert "words outside the world's vocabulary: hexagon, purple" in text
    log = capfd.readouterr()
    assert "Traceback" not in log.out + log.err


def _check_compare_page(img):
    assert img.shape[1] == 1400 and img.shape[0] > 1000
    # The gallery holds the world's samples: their pure red and blue shape pixels are on the page.
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    blue = (img[..., 2] > 200) & (img[..., 0] < 60) & (img[..., 1] < 60)
    assert red.sum() > 200 and blue.sum() > 200


def test_eight_steered_requests_at_concurrency_4_all_succeed(tmp_path):
    """Served with --concurrency 4: eight FK comparisons sent at once all come back whole (one shared model)."""
    from concurrent.futures import ThreadPoolExecutor

    app, url = launch(DemoConfig(rewards=["world-verifier"]), block=False, concurrency=4)
    try:
        client = gradio_client.Client(url, verbose=False)
        ks = [1, 2, 3, 4, 1, 2, 3, 4]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda k: client.predict(PROMPT, k, 4, 3.0, 32, 1, [], "fk", k, 10.0,
                                                             ["world-verifier"], api_name="/compare"), ks))
    finally:
        assert wait_idle(app)
        app.close()
    for k, (gallery, *_rest, ess) in zip(ks, results, strict=True):
        assert [g["caption"] for g in gallery] == [f"base · seed {k}", f"steered (fk) · seed {k}"]
        assert len(ess["data"]) > 0  # each request's own FK report
