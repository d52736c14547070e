"""Shared test set-up: offline, deterministic, small."""

import os

# Tests never download: hub calls fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ANYGEN_SLOW=1."""
    if os.environ.get("ANYGEN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: set ANYGEN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cli_edit_eval(tmp_path):
    """``check(model, flag, value)``: ``anygen eval --suite edit`` with an editing flag
    (``--strength``, ``--image-guidance``) at 2 edits and 2 steps gives the records of
    ``evaluate_model`` called with that option, and its report records the setting."""
    import json

    from anygen.cli import main as cli
    from anygen.eval.run import evaluate_model
    from anygen.pipelines import Options

    def check(model, flag: str, value: float) -> None:
        field = {"--strength": "strength", "--image-guidance": "image_guidance_scale"}[flag]
        options = Options(steps=2, **{field: value})
        direct = evaluate_model(str(model), "edit", n=2, options=options, progress=False)
        out = tmp_path / "edit.json"
        argv = ["eval", "--model", str(model), "--suite", "edit", "--n", "2", "--steps", "2"]
        assert cli([*argv, flag, str(value), "-o", str(out), "--overwrite"]) == 0
        data = json.loads(out.read_text())
        assert data["meta"][field] == value
        assert [r["reasons"] for r in data["records"]] == [list(r.reasons) for r in direct.records]

    return check
