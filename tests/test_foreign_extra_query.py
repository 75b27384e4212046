"""Other recorders' files whose SDK arguments hold `extra_query`: the SDK sends it as the query
string, so the file answers the request with that query, and only that one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from llmproxy.store.document import from_document, sdk_query_items
from tests.support import CORPUS, LoopThread, start_proxy


def _model_list_file(body: dict[str, Any], models: list[str]) -> dict[str, Any]:
    # The shape of the corpus's model-list files (llama-stack's recorder, 2026-05 era).
    return {
        "test_id": None,
        "request": {
            "method": "POST",
            "url": "http://0.0.0.0:11434/v1/v1/models",
            "headers": {},
            "body": body,
            "endpoint": "/v1/models",
            "model": "",
        },
        "response": {
            "body": [
                {
                    "__type__": "openai.types.model.Model",
                    "__data__": {"id": model, "created": 1753937098, "object": "model", "owned_by": "library"},
                }
                for model in models
            ],
            "is_streaming": False,
        },
    }


def test_extra_query_is_written_as_the_sdk_writes_it() -> None:
    params = {"provider_id": "ollama", "limit": 3, "deep": True, "tags": ["a", "b"], "f": {"x": 1}, "skip": None}
    assert sdk_query_items(params) == [
        ("provider_id", "ollama"),
        ("limit", "3"),
        ("deep", "true"),
        ("tags[]", "a"),
        ("tags[]", "b"),
        ("f[x]", "1"),
    ]
    recording = from_document(
        _model_list_file({"extra_query": {"provider_id": "ollama"}}, ["m"]), lambda _method, _path: None
    )
    assert recording.request.query == [("provider_id", "ollama")]
    assert recording.request.url == "http://0.0.0.0:11434/v1/v1/models?provider_id=ollama"
    assert recording.request.body == {}  # extra_query is not part of the wire body
    assert (recording.request.method, recording.request.path) == ("GET", "/v1/models")


def test_a_file_with_extra_query_answers_its_own_request_and_not_the_plain_one(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    extra = {"provider_id": "ollama", "tags": ["chat", "embed"], "deep": True}
    (recordings / "models-with-query.json").write_text(
        json.dumps(_model_list_file({"extra_query": extra}, ["llama3.2:3b", "all-minilm:l6-v2"]), indent=2)
    )
    (recordings / "models-plain.json").write_text(json.dumps(_model_list_file({}, ["gpt-plain"]), indent=2))
    # A real corpus model list alongside: it keeps answering the plain request's twin elsewhere.
    corpus_models = sorted(CORPUS.glob("*__models-*.json")) if CORPUS.is_dir() else []
    for path in corpus_models[:1]:
        shutil.copy(path, recordings / path.name)
    proxy = start_proxy(loop_thread, "replay", recordings)
    try:
        assert proxy.server.mode.index.problems == []
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list(extra_query=extra)] == ["llama3.2:3b", "all-minilm:l6-v2"]
        # The same parameters in another order are the same query.
        reordered = dict(reversed(list(extra.items())))
        assert [m.id for m in client.models.list(extra_query=reordered)] == ["llama3.2:3b", "all-minilm:l6-v2"]
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.list(extra_query={"provider_id": "vllm"})
        assert caught.value.code == "recording_not_found"
    finally:
        proxy.stop()


def test_the_plain_request_is_not_served_a_file_made_for_a_query(loop_thread: LoopThread, tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    extra = {"provider_id": "ollama"}
    (recordings / "models-with-query.json").write_text(json.dumps(_model_list_file({"extra_query": extra}, ["q"])))
    (recordings / "models-plain.json").write_text(json.dumps(_model_list_file({}, ["plain"])))
    proxy = start_proxy(loop_thread, "replay", recordings)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["plain"]
        assert [m.id for m in client.models.list(extra_query=extra)] == ["q"]
        assert [m.id for m in client.models.list()] == ["plain"]
    finally:
        proxy.stop()
