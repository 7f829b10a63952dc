import pytest

from config import configure


def defaults():
    return {"lr": 2e-4, "epochs": 64, "compile": True, "model": "LightningDiT-XL/1", "ckpt": None,
            "betas": (0.9, 0.95), "torch": pytest}  # a module is not a config key


def test_overrides_parse_literals_and_types(tmp_path):
    g = defaults()
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("lr = 1e-4\nepochs = 3\nimport math\n")
    cfg = configure(g, [str(cfg_file), "--epochs", "5", "--model=LightningDiT-B/1", "--compile=False",
                        "--lr=1", "--betas=[0.5, 0.9]", "--ckpt=out/x.pt"])
    assert cfg == {"lr": 1.0, "epochs": 5, "compile": False, "model": "LightningDiT-B/1", "ckpt": "out/x.pt",
                   "betas": (0.5, 0.9)}
    assert g["epochs"] == 5 and isinstance(g["lr"], float)


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], "unknown option --nope"),
    (["--epochs=1.5"], "--epochs expects int"),
    (["--epochs=abc"], "--epochs='abc' is not a valid int"),
    (["--compile=1"], "--compile expects bool"),
    (["--epochs"], "--epochs needs a value"),
    (["missing_config.py"], "config file missing_config.py does not exist"),
])
def test_bad_overrides_name_the_key(argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[")) as e:
        configure(defaults(), argv)
    assert str(e.value).startswith("error:")


def test_config_file_with_unknown_key(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("learning_rate = 1e-4\n")
    with pytest.raises(SystemExit, match="unknown key 'learning_rate'"):
        configure(defaults(), [str(cfg_file)])


def test_checkpoint_files_are_atomic_and_a_folder_means_its_newest_step(tmp_path):
    import torch

    from config import checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
    for step in (9, 10, 100):
        save_checkpoint({"step": step}, str(tmp_path / checkpoint_name(step)))
    (tmp_path / "step_00000999.pt.tmp").write_bytes(b"")  # not a finished checkpoint
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "step_00000999.pt.tmp"
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000100.pt")
    assert load_checkpoint(str(tmp_path)) == {"step": 100}
    with pytest.raises(SystemExit, match="holds no step_"):
        load_checkpoint(str(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else "")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    assert torch.load(tmp_path / "step_00000010.pt", weights_only=True) == {"step": 10}
