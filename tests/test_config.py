"""config/runtime.py: settings with rules and --help, atomic writes, checkpoint and image reading, the metrics log."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from config.runtime import (MetricsLog, check_resume, checkpoint_name, configure, latest_checkpoint, list_images,
                            load_checkpoint, load_rgb, prepare_out_dir, rule_error, save_checkpoint, write_atomically)

SCRIPT = '''"""A test script."""
import os

# optimisation
lr = 2e-4  # > 0; peak learning rate
epochs = 64  # >= 1
decay = 0.9  # [0, 1); EMA
compile = None  # True | False | None; None: on CUDA only
mode = "stop"  # stop | skip
model = "LightningDiT-XL/1"  # text; a size
labels = None  # None | ints; grid columns
seeds = (0, 1)  # ints; a row per seed
ckpt = ""  # path
config = configure(globals())
'''


def script_globals(tmp_path, source=SCRIPT):
    path = tmp_path / "script.py"
    path.write_text(source)
    namespace = {"__file__": str(path), "__doc__": "A test script."}
    exec(compile(source.split("config = configure")[0], str(path), "exec"), namespace)
    return namespace


def test_overrides_parse_literals_types_and_config_files(tmp_path):
    g = script_globals(tmp_path)
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("lr = 1e-4\nepochs = 3\nimport math\n")
    cfg = configure(g, [str(cfg_file), "--epochs", "5", "--model=LightningDiT-B/1", "--compile=False", "--lr=1",
                        "--labels=[3, 4]", "--ckpt=2024"])
    assert cfg == {"lr": 1.0, "epochs": 5, "decay": 0.9, "compile": False, "mode": "stop", "model": "LightningDiT-B/1",
                   "labels": (3, 4), "seeds": (0, 1), "ckpt": "2024"}
    assert g["epochs"] == 5 and isinstance(g["lr"], float)


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], "unknown option --nope; --help lists the options"),
    (["--epochs=1.5"], "--epochs expects int"),
    (["--epochs=abc"], "--epochs='abc' is not a valid int"),
    (["--epochs"], "--epochs needs a value"),
    (["missing_config.py"], "config file missing_config.py does not exist"),
    (["--epochs=0"], "--epochs=0 is not allowed: it must be >= 1"),
    (["--lr=0"], "--lr=0.0 is not allowed: it must be > 0"),
    (["--lr=1e999"], "--lr=inf is not allowed: it must be a finite number > 0"),
    (["--decay=1"], r"--decay=1.0 is not allowed: it must be in \[0, 1\)"),
    (["--compile=1"], "--compile=1 is not allowed: it must be one of True, False, None"),
    (["--compile=flase"], "--compile='flase' is not allowed: it must be one of True, False, None"),
    (["--mode=halt"], "--mode='halt' is not allowed: it must be one of stop, skip"),
    (["--labels=abc"], "--labels='abc' is not allowed: it must be one of None, ints"),
    (["--labels=(1, 2.5)"], r"--labels=\(1, 2.5\) is not allowed"),
])
def test_bad_overrides_name_the_key_and_the_rule(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message) as e:
        configure(script_globals(tmp_path), argv)
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)


def test_config_file_with_unknown_key(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("learning_rate = 1e-4\n")
    with pytest.raises(SystemExit, match="unknown key 'learning_rate'"):
        configure(script_globals(tmp_path), [str(cfg_file)])


def test_a_setting_without_a_rule_is_a_developer_error(tmp_path):
    with pytest.raises(RuntimeError, match="settings without a rule in their comment: epochs"):
        configure(script_globals(tmp_path, SCRIPT.replace("epochs = 64  # >= 1", "epochs = 64")), [])


def test_help_prints_every_setting_with_default_rule_and_comment(tmp_path, capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            configure(script_globals(tmp_path), ["--lr=1", flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("A test script.")
        assert "# optimisation\n" in out
        assert [line.split()[:2] for line in out.splitlines() if line.startswith("  --")] == [
            ["--lr=2e-4", ">"], ["--epochs=64", ">="], ["--decay=0.9", "[0,"], ["--compile=None", "True"],
            ["--mode=\"stop\"", "stop"], ["--model=\"LightningDiT-XL/1\"", "text"], ["--labels=None", "None"],
            ["--seeds=(0,", "1)"], ["--ckpt=\"\"", "path"]]
        assert "  --lr=2e-4" in out and "> 0" in out and "peak learning rate" in out


@pytest.mark.parametrize("value, rule, ok", [
    (0, ">= 0", True), (-1, ">= 0", False), (1e-9, "> 0", True), (0.0, "> 0", False), (True, ">= 0", False),
    (float("nan"), ">= 0", False), (0.5, "[0, 1)", True), (1.0, "[0, 1)", False), (1.0, "[0, 1]", True),
    (1e30, "(0, inf)", True), (None, "True | False | None", True), (0, "True | False | None", False),
    ("skip", "stop | skip", True), ("", "path", True), ((1, 2), "None | ints", True), ((1.0,), "None | ints", False),
])
def test_rules(value, rule, ok):
    assert (rule_error(value, rule) is None) == ok


def test_resume_check_names_each_changed_setting(tmp_path):
    saved = {"lr": 1e-4, "seed": 0, "log_every": 10}
    check_resume(saved, {"lr": 1e-4, "seed": 0, "log_every": 99}, "ck.pt", free={"log_every"})
    with pytest.raises(SystemExit, match=r"ck.pt was trained with other settings \(lr 0.0001 -> 0.0002; seed 0 -> 1\)"):
        check_resume(saved, {"lr": 2e-4, "seed": 1, "log_every": 99}, "ck.pt", free={"log_every"})


def test_checkpoint_files_are_atomic_and_a_folder_means_its_newest_step(tmp_path):
    for step in (9, 10, 100):
        save_checkpoint({"step": step}, str(tmp_path / checkpoint_name(step)))
    (tmp_path / ".step_00000999.pt.tmp77").write_bytes(b"")  # not a finished checkpoint
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000100.pt")
    assert load_checkpoint(str(tmp_path)) == {"step": 100}
    with pytest.raises(SystemExit, match="lacks model, ema: it is"):
        load_checkpoint(str(tmp_path), need=("step", "model", "ema"), hint=": it is")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        load_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    release = tmp_path / "release" / "checkpoints"  # the release's layout: checkpoints/NNNNNNN.pt
    release.mkdir(parents=True)
    for step in (40000, 80000):
        torch.save({"step": step}, release / f"{step:07d}.pt")
    assert latest_checkpoint(str(tmp_path / "release")) == str(release / "0080000.pt")


def test_a_failed_write_removes_its_temp_file_and_keeps_the_old_file(tmp_path, capsys):
    path = tmp_path / "result.bin"
    write_atomically(str(path), lambda f: f.write(b"old"))

    def fail_halfway(f):
        f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file data/0")
    with pytest.raises(SystemExit, match=r"could not write .*result.bin \(.*PytorchStreamWriter failed writing file "
                                         r"data/0; \d+ MiB free there\)\. Free disk space"):
        write_atomically(str(path), fail_halfway)
    assert os.listdir(tmp_path) == ["result.bin"] and path.read_bytes() == b"old"
    (tmp_path / ".result.bin.tmp123").write_bytes(b"left by a kill")
    prepare_out_dir(str(tmp_path))
    assert "removed 1 temporary file(s)" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["result.bin"]


def test_images_are_read_the_same_everywhere(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(gray16).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    expected = np.round(gray16 / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "a16.png"))[..., 0], expected)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "b.tif")
    Image.fromarray(rgb).save(tmp_path / "c.webp", lossless=True)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "c.webp")), rgb)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgb).save(tmp_path / "sub" / "d.bmp")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # a link back up: followed once, not forever
    assert [os.path.relpath(f, tmp_path) for f in list_images(str(tmp_path))] == [
        "a16.png", "b.tif", "c.webp", "sub/d.bmp"]


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    log = MetricsLog(str(tmp_path), 0, 10, master=True)
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # a line cut short by a crash
    log = MetricsLog(str(tmp_path), 3, 10, master=True)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert log.log(4, {"loss": 0.2}) != "?"  # an ETA once a step is done
    log.plot()
    assert Image.open(tmp_path / "metrics.png").size == (640, 110)
    assert "loss last 0.2000, best 0.2000 at step 4" in log.summary(4, 8, "loss")
