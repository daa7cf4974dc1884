import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory):
    """A prepared synthetic store (images -> EfficientNet grid, text cache, ROUGE-L), built once."""
    from hosa_lib.config import DataConfig
    from hosa_lib.prepare import prepare

    d = tmp_path_factory.mktemp("smoke")
    dc = DataConfig(store=str(d / "smoke.h5"), n_images=40, image_size=96, seed=3)
    prepare(dc, progress=False)
    return dc
