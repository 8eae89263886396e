"""Every setting has a flag and an env var, and env values are checked like flags."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from aiotranscribe.cli import main
from aiotranscribe.config import Settings

# Settings whose flag is not just the field name with dashes.
FLAG_OF = {
    "models": "--model",
    "api_keys": "--api-key",
    "cors_origins": "--cors-origin",
    "allowed_hosts": "--allowed-host",
    "allowed_networks": "--allow-network",
}


def serve_help() -> str:
    return subprocess.run(
        [sys.executable, "-m", "aiotranscribe", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout


def test_every_setting_has_a_flag():
    text = serve_help()
    missing = [
        f.name
        for f in dataclasses.fields(Settings)
        if FLAG_OF.get(f.name, "--" + f.name.replace("_", "-")) not in text
    ]
    assert missing == []


def test_an_env_value_outside_the_choices_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("AIOTRANSCRIBE_EXECUTOR", "proces")
    try:
        main(["serve", "--port", "1"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("serve started with AIOTRANSCRIBE_EXECUTOR=proces")
    err = capsys.readouterr().err
    assert "AIOTRANSCRIBE_EXECUTOR" in err and "'proces'" in err


def test_env_values_reach_the_settings(monkeypatch):
    from aiotranscribe.cli import settings_from_args

    monkeypatch.setenv("AIOTRANSCRIBE_CONVERT_TIMEOUT_S", "42")
    monkeypatch.setenv("AIOTRANSCRIBE_JANITOR_INTERVAL_S", "7")
    import argparse

    from aiotranscribe.cli import _serve_parser

    parser = argparse.ArgumentParser()
    _serve_parser(parser.add_subparsers(dest="command"))
    settings = settings_from_args(parser.parse_args(["serve"]))
    assert settings.convert_timeout_s == 42.0 and settings.janitor_interval_s == 7.0


def test_performance_settings_from_env_and_flags(monkeypatch):
    import argparse

    from aiotranscribe.cli import _serve_parser, settings_from_args

    parser = argparse.ArgumentParser()
    monkeypatch.setenv("AIOTRANSCRIBE_FAST_DECODING", "off")
    monkeypatch.setenv("AIOTRANSCRIBE_WORKERS", "2")
    monkeypatch.setenv("AIOTRANSCRIBE_MAX_BATCH_AUDIO_S", "480")
    _serve_parser(parser.add_subparsers(dest="command"))
    settings = settings_from_args(parser.parse_args(["serve", "--precision", "bf16"]))
    assert (settings.fast_decoding, settings.workers, settings.precision) == (False, 2, "bf16")
    assert settings.max_batch_audio_s == 480.0 and settings.max_batch_wait_ms == 5.0
    args = parser.parse_args(["serve", "--fast-decoding", "--max-batch-wait-ms", "0"])
    settings = settings_from_args(args)
    assert settings.fast_decoding is True and settings.max_batch_wait_ms == 0.0
