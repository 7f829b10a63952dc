"""The README's promises: its commands name real scripts, config files and options, CI runs its test command, and the
demo pipeline (config/demo.sh) runs end to end (here in its quick form: every stage for a few steps)."""
import ast
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

from config.runtime import read_settings
from conftest import ASSETS, ROOT

README = open(os.path.join(ROOT, "README.md")).read()


def script_options(script):
    """The settings of a script (its constants block, as --help lists them), and --help itself."""
    return set(read_settings(os.path.join(ROOT, script))[0]) | {"help"}


def readme_commands():
    """Every command of the README's indented code blocks, continuation lines joined."""
    blocks = re.findall(r"(?:^    .*\n)+", README, flags=re.M)
    text = "\n".join(block.replace("\\\n", " ") for block in blocks)
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()[-1]
    assert ci in readme_commands()


SCRIPTS = ["train_dit.py", "train_vavae.py", "prepare.py", "sample.py", "fid.py", "bench.py"]


def docstring_commands():
    """Every command line of the scripts' docstrings (lines naming python or torchrun), continuation lines joined."""
    commands = []
    for script in SCRIPTS:
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script)).read())) or ""
        commands += [line.split("#")[0].strip() for line in doc.replace("\\\n", " ").splitlines()
                     if re.match(r"\s*(\S+=\S+ )*(python|torchrun)", line)]
    return commands


def test_readme_and_docstring_commands_use_real_scripts_configs_and_options():
    checked = 0
    for command in readme_commands() + docstring_commands():
        words = shlex.split(command.replace("$RANK", "0").replace("$HOST", "h"))
        scripts = [w for w in words if w.endswith(".py") and "/" not in w and os.path.exists(os.path.join(ROOT, w))]
        for script in scripts:
            options = script_options(script)
            args = words[words.index(script) + 1:]
            for arg in args:
                if arg.startswith("--"):
                    key = arg[2:].split("=")[0]
                    assert key in options, f"README: {script} has no option --{key} ({command})"
                    checked += 1
                elif arg.endswith(".py"):
                    assert os.path.exists(os.path.join(ROOT, arg)), f"README: {arg} does not exist"
    assert checked >= 60  # the parse found the commands
    assert len(docstring_commands()) >= 12


def test_demo_pipeline_runs_end_to_end(tmp_path):
    env = {**os.environ, "DEMO_QUICK": "1", "DEMO_OUT": str(tmp_path / "demo"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "2"}
    inception = os.path.join(ASSETS, "pt_inception-2015-12-05.pth")
    if os.path.exists(inception):
        env["INCEPTION_WEIGHTS"] = inception
    else:
        print(f"demo FID step runs without weights: {inception} not found")
    result = subprocess.run(["sh", "config/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = tmp_path / "demo"
    grid = Image.open(out / "grid.png")
    assert grid.size == (10 * 64, 4 * (64 + 14))  # 32 px samples shown at 2x, each over its caption
    assert np.load(out / "samples" / "samples.npz")["arr_0"].shape == (20, 32, 32, 3)
    last_lines = "\n".join(result.stdout.strip().splitlines()[-3:])  # the final lines say where the outputs are
    for path in (f"{out}/grid.png", f"{out}/dit/samples_*.png", f"{out}/vavae, {out}/dit"):
        assert path in last_lines
    assert os.path.exists(out / "dit" / "samples_00000004.png")
    if "INCEPTION_WEIGHTS" in env:
        assert 0 < json.load(open(out / "fid.json"))["fid"] < 1000
        results = result.stdout.split("== results (")[1]  # the closing block: time, PSNR, FID, class accuracy
        assert re.match(r"\d+ s in all\)\nrecon PSNR [0-9.]+ dB \| FID [0-9.]+ \(20 samples\) \| class accuracy "
                        r"\d+%\n", results), results
        assert Image.open(out / "recon.reconstructions.png").size == (8 * 32, 2 * 32)  # 8 of 10 images over theirs
    else:
        assert "FID skipped" in result.stdout


def test_every_script_has_help_read_from_its_constants_block():
    for script, flag in zip(SCRIPTS, ["-h"] + ["--help"] * len(SCRIPTS)):
        result = subprocess.run([sys.executable, script, flag], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and not result.stderr.strip(), (script, result.stderr[-2000:])
        settings = read_settings(os.path.join(ROOT, script))[0]
        lines = [line for line in result.stdout.splitlines() if line.startswith("  --")]
        assert [line.split("=")[0].strip() for line in lines] == [f"--{k}" for k in settings], script
        for name, (default, rule, comment) in settings.items():  # each line: default, rule, comment
            line = next(line for line in result.stdout.splitlines() if line.startswith(f"  --{name}="))
            assert line.startswith(f"  --{name}={default}") and rule in result.stdout and comment in result.stdout
