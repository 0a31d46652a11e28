"""Feedback: answers rated (good/bad) or corrected where they appeared, kept as training data.

``store`` keeps the marks (append-only JSON lines, one file per fine-tune, 0600 under SAGE_HOME);
``data`` turns them into what the rest of the engine reads: a table to show, training rows, an eval test set
and a chat-format JSONL file other trainers read. Nothing here knows a face: the panel, ``%sage rate``,
``reply.rate()`` and ``sage feedback`` all go through these two modules.
"""
