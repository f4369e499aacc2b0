"""HBONE settings: large-window defaults, validation naming the setting, environment overrides."""

from __future__ import annotations

import pytest

from agent.hbone.config import MIB, HboneSettings, hbone_settings_from_env
from agent.settings import SettingsError


def test_defaults_are_large_windows_and_frames() -> None:
    settings = HboneSettings()
    assert settings.stream_window == 16 * MIB
    assert settings.connection_window == 64 * MIB
    assert settings.max_frame_size == 1 * MIB
    assert settings.max_concurrent_streams == 100


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"stream_window": 65_534}, "hbone.stream_window"),
        ({"stream_window": 2**31}, "hbone.stream_window"),
        ({"connection_window": 2**31}, "hbone.connection_window"),
        ({"stream_window": 8 * MIB, "connection_window": 4 * MIB}, "hbone.connection_window"),
        ({"max_frame_size": 16_383}, "hbone.max_frame_size"),
        ({"max_frame_size": 2**24}, "hbone.max_frame_size"),
        ({"max_concurrent_streams": 0}, "hbone.max_concurrent_streams"),
        ({"max_concurrent_streams": 2**32}, "hbone.max_concurrent_streams"),
    ],
)
def test_bad_values_are_named(kwargs: dict[str, int], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        HboneSettings(**kwargs)


def test_http2_extremes_are_accepted() -> None:
    HboneSettings(
        stream_window=65_535, connection_window=65_535, max_frame_size=16_384, max_concurrent_streams=1
    )
    HboneSettings(stream_window=2**31 - 1, connection_window=2**31 - 1, max_frame_size=2**24 - 1)


def test_environment_overrides_defaults() -> None:
    settings = hbone_settings_from_env(
        {
            "AMBIENT_HBONE_STREAM_WINDOW": "0x400000",
            "AMBIENT_HBONE_CONNECTION_WINDOW": "16777216",
            "AMBIENT_HBONE_MAX_FRAME_SIZE": "65536",
            "AMBIENT_HBONE_MAX_STREAMS": "250",
        }
    )
    assert settings == HboneSettings(
        stream_window=4 * MIB, connection_window=16 * MIB, max_frame_size=65536, max_concurrent_streams=250
    )
    assert hbone_settings_from_env({}) == HboneSettings()


def test_environment_errors_name_the_variable_or_setting() -> None:
    with pytest.raises(SettingsError, match="AMBIENT_HBONE_MAX_STREAMS"):
        hbone_settings_from_env({"AMBIENT_HBONE_MAX_STREAMS": "many"})
    with pytest.raises(SettingsError, match=r"hbone\.max_frame_size"):
        hbone_settings_from_env({"AMBIENT_HBONE_MAX_FRAME_SIZE": "1024"})
