"""The embedded Ray's token file is its owner's only."""

from __future__ import annotations

import stat

from cluster.remote.local_cluster import secure_embedded_token


def test_token_file_is_created_or_narrowed_to_mode_600(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    path = secure_embedded_token()
    assert path == tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    token = path.read_text()
    path.chmod(0o644)  # as Ray itself leaves it
    assert secure_embedded_token() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token  # kept, only narrowed


def test_an_explicit_choice_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secure_embedded_token() is None
    assert not (tmp_path / ".ray").exists()
