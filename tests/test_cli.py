"""Every CLI: usage from any folder, --help without importing torch, one-line errors with exit 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLIS = ["prepare", "train", "evaluate", "pipeline"]


def cli(tmp_path, name, *args):
    return subprocess.run([sys.executable, "-m", f"hosa_lib.{name}", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path)


@pytest.mark.parametrize("name", CLIS)
def test_help_answers_before_torch_is_imported(tmp_path, name):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", f"hosa_lib.{name}", "--help"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0
    assert f"usage: python -m hosa_lib.{name}" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported
    from hosa_lib.cli import parser
    assert all(action.help for action in parser(name)._actions), "every argument has help text"


@pytest.mark.parametrize("name", ["prepare", "train", "pipeline"])
@pytest.mark.slow
def test_config_errors_are_one_line_exit_2(tmp_path, name):
    missing = cli(tmp_path, name, tmp_path / "nope.yaml")
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: params file not found: {tmp_path / 'nope.yaml'}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {Path(__file__).resolve().parent.parent / 'params' / 'smoke.yaml'}\ntrain:\n  epochz: 3\n")
    proc = cli(tmp_path, name, bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown key 'train.epochz'" in proc.stderr and str(bad) in proc.stderr
    debug = cli(tmp_path, name, bad, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_base_chain_loop_and_missing_base_are_named(tmp_path):
    from hosa_lib.config import ConfigError, load
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base: chain loops .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load(a)
    c = tmp_path / "c.yaml"
    c.write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone\.yaml \(named by base: in .*c\.yaml\)"):
        load(c)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty params file"):
        load(empty)
    lr = tmp_path / "lr.yaml"
    lr.write_text("base: b2.yaml\ntrain: {lr: 1e-3}\n")
    (tmp_path / "b2.yaml").write_text("name: x\n")
    assert load(lr).train.lr == 0.001  # PyYAML reads 1e-3 as a string


def test_truncated_checkpoint_is_named_with_the_alternative(tmp_path):
    import torch
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}}, ck / "best.pt")
    data = (ck / "best.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 2])
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"base": str(Path(__file__).resolve().parent.parent / "params" / "smoke.yaml")}))
    proc = cli(tmp_path, "evaluate", params, "--checkpoint", ck / "last.pt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{ck / 'last.pt'}: not a readable checkpoint" in proc.stderr and "try best.pt" in proc.stderr
