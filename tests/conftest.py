"""Shared fixtures: a tiny random model saved as a local HF directory with a locally trained tokenizer, and an
unreadable file."""

from __future__ import annotations

import os

import pytest

from tiny_models import build_tokenizer, tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer and chat template, saved like any local HF model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=2048)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def deny_reading(monkeypatch):
    """Make a file unreadable, as a user without permission meets it. Root reads anything whatever the mode, so
    then the open itself is made to fail."""

    def deny(path):
        if os.geteuid() != 0:
            path.chmod(0)
            return
        real_open = os.open

        def denying_open(file, flags, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denying_open)

    return deny


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """A cache directory of its own (converted models, the read cache) and no infllm settings from the
    environment, for command-line runs."""
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    for name in ("INFLLM_CACHE_LIMIT_MB", "INFLLM_MODEL", "INFLLM_WINDOW", "INFLLM_TOPK", "INFLLM_SINKS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def book(tmp_path):
    """A text of ~2,000 tokens of the tiny tokenizer: well over the small windows the command-line tests use."""
    path = tmp_path / "book.txt"
    path.write_text("".join(f"Line {i}: the pass key is {i * 7 % 101}. Remember it.\n" for i in range(150)))
    return path
