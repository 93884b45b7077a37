"""`visalign sample` end to end, in process, and its input validation; every shipped config loads."""

import re
from pathlib import Path

import pytest
from PIL import Image

from visalign.cli import main
from visalign.config import load_config
from visalign.generate import SampleConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_sample_writes_png(tmp_path, capsys):
    out = tmp_path / "s.png"
    rc = main(["sample", "--model", "tiny-sd3", "--prompt", "a red circle", "--prompt", "a blue square",
               "--steps", "2", "--out", str(out), "seed=3"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    im = Image.open(out)
    assert im.size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # a 1x2 grid with 2 px padding


def test_sample_video_gif(tmp_path):
    out = tmp_path / "v.gif"
    assert main(["sample", "--model", "tiny-wan", "--height", "16", "--width", "16", "--num-frames", "5",
                 "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).n_frames == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nope"], "unknown model .nope.*allowed: flux, .*sd3, .*tiny-flux"),
        (["--height", "33"], "multiple of 2"),
        (["--steps", "0"], "steps=0 must be >= 1"),
        (["--guidance", "-1"], "guidance=-1.0 must be >= 0"),
        (["--model", "tiny-wan", "--num-frames", "8", "--height", "16", "--width", "16"], "4k\\+1"),
        (["--model", "sd3", "--model-path", "/missing/dir"], "does not exist"),
        (["--sde", "ddim"], "expected one of 'ode', 'flow_grpo', 'cps', 'dance'"),
        (["stepz=3"], "unknown field stepz"),
    ],
)
def test_sample_bad_input(argv, message, capsys):
    assert main(["sample", *argv]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def _config_class(command: str):
    """The config dataclass of the command a shipped YAML's first line names."""
    from visalign.steering.config import SteerConfig
    from visalign.world.pretrain import PretrainConfig
    from visalign.world.suite import WorldEvalConfig

    words = command.split()
    if words[1:2] == ["train"]:
        from visalign.registry import import_target
        from visalign.trainers import TRAINERS, trainer_name

        return import_target(TRAINERS[trainer_name(str(CONFIGS[0].parent / words[2].split("/")[-1]), [])][0])
    table = {("sample",): SampleConfig, ("world", "pretrain"): PretrainConfig, ("eval",): WorldEvalConfig,
             ("steer",): SteerConfig}
    for key, cls in table.items():
        if tuple(words[1:1 + len(key)]) == key:
            return cls
    raise AssertionError(f"no config class known for {command!r}")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_start_with_their_command(path, tmp_path, monkeypatch):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# visalign ") and path.name in first
    # The real-model configs name the user's data files (prompts/*.txt, data/*.jsonl; editing: prompts naming
    # source images), which must exist when the config loads: provide them, relative to the working directory as a
    # user's would be.
    for name in ("prompts/pickscore_train.txt", "prompts/hps_train.txt", "prompts/video_train.txt",
                 "data/pairs.jsonl", "data/video_pairs.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("a prompt\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "prompts" / "source.png")  # the editing configs' prompt file
    (tmp_path / "prompts" / "edits_train.jsonl").write_text('{"prompt": "make it red", "source_image": "source.png"}\n')
    monkeypatch.chdir(tmp_path)
    load_config(_config_class(first[2:]), path.resolve())


@pytest.mark.parametrize("argv, message", [
    (["demo", "--concurrency", "0"], "--concurrency=0 must be >= 1"),
    (["demo", "--max-pixels", "0"], "max_pixels=0 must be >= 1"),
    (["demo", "--max-upload-mb", "-1"], "max_upload_mb=-1.0 must be > 0"),
])
def test_demo_limits_are_checked_before_anything_loads(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("path", list(__import__("visalign.cli", fromlist=["CONFIG_CLASSES"]).CONFIG_CLASSES))
def test_help_lists_every_config_field_with_type_and_default(path, capsys):
    from visalign.cli import CONFIG_CLASSES
    from visalign.config import describe_fields
    from visalign.registry import import_target

    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    rows = describe_fields(import_target(CONFIG_CLASSES[path]))
    assert rows and all(f"  {name} " in out for name, _, _ in rows)
    assert all(kind in out for _, kind, _ in rows)  # "type = default"


@pytest.mark.parametrize("argv, message", [
    (["train", "configs/flow_grpo_world.yaml", "train.lrr=1"], "unknown field train.lrr (did you mean 'lr'?)"),
    (["train", "configs/flow_grpo_world.yaml", "rewards={world-verifer: 1}"],
     "unknown reward 'world-verifer' (did you mean 'world-verifier'?)"),
    (["train", "configs/flow_grpo_world.yaml", "model.name=wrld"], "unknown model 'wrld' (did you mean 'world'?)"),
    (["train", "configs/flow_grpo_world.yaml", "trainer=flow_grp"], "(did you mean 'flow_grpo'?)"),
    (["steer", "configs/steer_world.yaml", "rewards={world-verifer: 1}"], "(did you mean 'world-verifier'?)"),
    (["steer", "configs/steer_world.yaml", "method=bst_of_n"], "(did you mean 'best_of_n'?)"),
    (["steer", "configs/steer_world.yaml", "stepz=3"], "unknown field stepz (did you mean 'steps'?)"),
    (["sample", "--model", "tiny-sd33"], "unknown model 'tiny-sd33' (did you mean 'tiny-sd3'?)"),
    (["sample", "--sde", "od"], "(did you mean 'ode'?)"),
    (["eval", "--suite", "wrld"], "unknown suite 'wrld' (did you mean 'world'?)"),
    (["world", "pretrain", "stepz=3"], "unknown field stepz (did you mean 'steps'?)"),
])
def test_typos_get_one_line_with_a_suggestion(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_demo_bind_errors_are_one_line(capsys):
    import socket

    assert main(["demo", "--port", "99999"]) == 2
    assert capsys.readouterr().err == "visalign demo: error: --port=99999 must be between 1 and 65535\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"visalign demo: error: cannot serve on 127.0.0.1:{port}") and err.count("\n") == 1


def test_models_vocab_and_reward_summaries_explain_themselves(capsys):
    from visalign.models import list_models

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    # every registered model appears, each family with its tiny builds, hub ids and options
    assert all(re.search(rf"(^|[ (,]){re.escape(name)}([),]|$|\n|  )", out, re.M) for name in list_models())
    assert "qwen-image  (tiny: tiny-qwen-image)\n    Qwen-Image text-to-image" in out
    assert "hub: Wan-AI/Wan2.2-TI2V-5B-Diffusers, Wan-AI/Wan2.2-T2V-A14B-Diffusers" in out
    assert "options: max_sequence_length, experts, guidance_scale_2" in out
    assert main(["world", "vocab"]) == 0
    out = capsys.readouterr().out
    assert "colours:   red, yellow, green, cyan, blue, magenta" in out and "relation     a " in out
    assert main(["rewards", "list"]) == 0
    rows = [r.split(" | ")[-1].rstrip(" |") for r in capsys.readouterr().out.splitlines()[2:]]
    assert rows and all(r.endswith((".", "…", ")")) for r in rows)  # whole sentences, or cut with a mark
