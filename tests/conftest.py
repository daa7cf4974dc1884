import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "TRITON_INTERPRET" not in os.environ:  # no GPU: Triton's CPU interpreter, set before anything imports triton
    import torch  # (@triton.jit reads it when a kernel is defined; transformers imports triton at its own import)

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory):
    """A prepared synthetic store (images -> EfficientNet grid, text cache, ROUGE-L), built once."""
    from hosa_lib.config import DataConfig
    from hosa_lib.prepare import prepare

    d = tmp_path_factory.mktemp("smoke")
    dc = DataConfig(store=str(d / "smoke.h5"), n_images=40, image_size=96, seed=3)
    prepare(dc, progress=False)
    return dc


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory):
    """A project folder as a user has it (params/, notebooks/), whose params/demo.yaml — the
    notebooks' default — is the smoke configuration; the pipeline has run it once, from elsewhere."""
    import shutil
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "params", root / "params")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    raw = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    raw["name"] = "demo"
    (root / "params" / "demo.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "hosa_lib.pipeline", str(root / "params" / "demo.yaml")],
                          capture_output=True, text=True, cwd=tmp_path_factory.mktemp("elsewhere"))
    return root, proc


