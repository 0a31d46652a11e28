"""The kernel session's data: replies that copy and pickle."""

from __future__ import annotations

import copy
import pickle

from sage_magic.chat.reply import Reply

# --- without a server -----------------------------------------------------------------------------------------


def test_a_reply_survives_copy_deepcopy_and_every_pickle_protocol() -> None:
    """`-o answer` then `%store answer`, `copy.deepcopy(answer)` or sending it to a multiprocessing worker."""
    reply = Reply("Roses are red.", model="demo_poet", prompt="Who are you?", cancelled=True,
                  citations=[{"n": 1, "source": "notes.md", "location": "# Intro", "score": 0.5, "text": "x"}],
                  metrics={"server": "abc", "prompt_tokens": 7, "ttft_s": 0.01})
    copies = [copy.copy(reply), copy.deepcopy(reply)]
    copies += [pickle.loads(pickle.dumps(reply, protocol)) for protocol in range(pickle.HIGHEST_PROTOCOL + 1)]
    for again in copies:
        assert type(again) is Reply and again == reply and again.text == "Roses are red."
        assert (again.model, again.prompt, again.citations, again.metrics, again.cancelled) == (
            reply.model, reply.prompt, reply.citations, reply.metrics, reply.cancelled)
    deep = copies[1]
    deep.citations[0]["n"] = 2
    assert reply.citations[0]["n"] == 1  # a deep copy owns its citations
