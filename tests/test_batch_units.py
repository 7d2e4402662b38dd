"""The batch job's decision to start no encoder actor (`deployments.batch._holds_media`): a job whose rows it finds
no media in has no Encoders stage, so it must find every media part the API would read, in either input form."""

from __future__ import annotations

import json

from deployments.batch import _holds_media


def _row(*parts, form="ours") -> dict:
    request = {"messages": [{"role": "user", "content": list(parts)}]}
    if form == "ours":
        return {"id": "r", **request}
    return {"custom_id": "r", "method": "POST", "url": "/v1/chat/completions", "body": request}


def test_every_media_part_is_found_in_both_forms():
    media = [{"type": "image_url", "image_url": {"url": "a.png"}},
             {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
             {"type": "audio_url", "audio_url": {"url": "a.wav"}},
             {"type": "video_url", "video_url": {"url": "a.mp4"}}]
    for part in media:
        for form in ("ours", "openai"):
            # from the row's JSON text, as the job reads it: the type spelt with an escape is the same type
            kind = part["type"]
            line = json.dumps(_row({"type": "text", "text": "look"}, part, form=form))
            line = line.replace(f'"{kind}"', '"' + kind.replace("_", "\\u005f") + '"')
            assert "\\u005f" in line and _holds_media(json.loads(line)), (part, form)


def test_text_rows_hold_none():
    assert not _holds_media(_row({"type": "text", "text": "an image_url, in words"}))
    assert not _holds_media({"id": "r", "messages": [{"role": "user", "content": "image_url"}],
                             "audio": {"voice": "ethan", "format": "wav"},
                             "tools": [{"type": "function", "function": {"name": "f"}}]})


def test_a_row_nested_deeper_than_the_api_takes_is_walked_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert not _holds_media({"id": "r", "messages": deep})
    assert _holds_media({"id": "r", "messages": [deep, {"type": "image_url"}]})
