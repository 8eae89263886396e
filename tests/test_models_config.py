"""The models to serve: ``--model`` items, the models file, and names that clash."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiotranscribe import cli
from aiotranscribe.config import ModelsError, Settings, model_table


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_no_models_means_the_demo():
    table = model_table(Settings())
    assert list(table) == ["demo"]
    assert table["demo"].languages == ("en",)


def test_model_items_take_names(tmp_path):
    table = model_table(
        Settings(models=("fast=/m/a.nemo", "/m/b.nemo", "nvidia/parakeet-ctc-1.1b"))
    )
    assert [(m.name, m.source) for m in table.values()] == [
        ("fast", "/m/a.nemo"),
        ("b", "/m/b.nemo"),
        ("nvidia/parakeet-ctc-1.1b", "nvidia/parakeet-ctc-1.1b"),
    ]


def test_a_models_file_gives_per_model_settings(tmp_path):
    path = write(
        tmp_path,
        """
[models.parakeet]
source = "models/parakeet-tdt_ctc-110m.nemo"
decoder = "ctc"
batch_size = 16
device = "cuda:1"

[models.canary]
source = "nvidia/canary-1b-flash"
max_slice_s = 30
languages = ["EN", "de"]
""",
    )
    table = model_table(Settings(models=("demo",), models_file=path))
    assert list(table) == ["parakeet", "canary", "demo"]  # the file's first, then --model's
    parakeet = table["parakeet"]
    assert parakeet.source == str(tmp_path / "models" / "parakeet-tdt_ctc-110m.nemo")
    assert (parakeet.decoder, parakeet.batch_size, parakeet.device) == ("ctc", 16, "cuda:1")
    canary = table["canary"]
    assert canary.max_slice_s == 30.0 and canary.languages == ("en", "de")
    assert canary.engine_config() == {
        "name": "canary",
        "decoder": None,
        "max_slice_s": 30.0,
        "languages": ["en", "de"],
        "precision": None,
        "fast_decoding": None,
    }


def test_workers_and_devices_per_model(tmp_path):
    path = write(
        tmp_path,
        """
[models.big]
source = "big.nemo"
device = "cuda:0, cuda:1"
workers = 2
max_batch_audio_s = 600
precision = "bf16"
fast_decoding = false

[models.small]
source = "small.nemo"
""",
    )
    settings = Settings(models_file=path, device="cpu", workers=3, torch_threads=2)
    big, small = (m.resolved(settings) for m in model_table(settings).values())
    # One worker per device entry, ``workers`` times each.
    assert big.worker_devices() == ("cuda:0", "cuda:0", "cuda:1", "cuda:1")
    assert big.max_batch_audio_s == 600.0
    assert big.engine_config()["precision"] == "bf16"
    assert big.engine_config()["fast_decoding"] is False
    # The server-wide settings where the table says nothing.
    assert small.worker_devices() == ("cpu", "cpu", "cpu")
    assert small.engine_config()["precision"] == "fp32"
    assert small.engine_config()["fast_decoding"] is True
    assert small.max_batch_audio_s is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models.a]\nsource = "x.nemo"\ndecoder = "beam"\n', "decoder must be one of"),
        ('[models.a]\nsource = "x.nemo"\ncolour = "red"\n', "unknown keys ['colour']"),
        ("[models.a]\nbatch_size = 2\n", "needs source"),
        ('[models.a]\nsource = "x.nemo"\nlanguages = "en"\n', "languages must be a list"),
        ("[other]\n", "no [models.NAME] table"),
        ('[models.a]\nsource = "x.nemo"\nworkers = 0\n', "workers must be >= 1"),
        ('[models.a]\nsource = "x.nemo"\nprecision = "int8"\n', "precision must be one of"),
        ('[models.a]\nsource = "x.nemo"\nfast_decoding = "yes"\n', "must be true or false"),
        ("[models.a\n", "cannot read models file"),
    ],
)
def test_a_bad_models_file_is_refused(tmp_path, text, message):
    with pytest.raises(ModelsError, match=None) as info:
        model_table(Settings(models_file=write(tmp_path, text)))
    assert message in str(info.value)


def test_two_models_with_one_name_name_both_sources(tmp_path):
    with pytest.raises(ModelsError) as info:
        model_table(Settings(models=("a/model.nemo", "b/model.nemo")))
    assert "a/model.nemo" in str(info.value) and "b/model.nemo" in str(info.value)


def test_the_server_does_not_start_with_two_models_of_one_name(tmp_path, capsys):
    path = write(tmp_path, '[models.model]\nsource = "/m/one.nemo"\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--models-file", str(path), "--model", "/m/two/model.nemo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "/m/one.nemo" in err and "/m/two/model.nemo" in err
