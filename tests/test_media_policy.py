"""Refused remote media name the switch of whoever refused them: the server's flag, or the library's option."""

from __future__ import annotations

import pytest

from llama3v.runtime import openai_api as oa
from llama3v.runtime.chat_handler import Llama3vChatHandler

REMOTE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}},
                                       {"type": "text", "text": "What is this?"}]}]


def test_server_policy_names_the_server_flag():
    with pytest.raises(oa.RequestError, match="--allow-remote") as e:
        oa.session_messages(REMOTE, oa.MediaPolicy(), [])
    assert e.value.status == 403


@pytest.mark.parametrize("media", [None, oa.MediaPolicy(any_path=True)])
def test_chat_handler_names_its_own_switch(media):
    handler = Llama3vChatHandler(None, media=media)
    with pytest.raises(oa.RequestError) as e:
        handler(llama=object(), messages=REMOTE)  # refused before the model is touched
    assert "--allow-remote" not in str(e.value)
    assert "media=MediaPolicy(any_path=True, allow_remote=True) to Llama3vChatHandler" in str(e.value)
    assert not handler.media.allow_remote and handler.media.any_path
