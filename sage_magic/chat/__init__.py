"""Talking to a served model: the streaming client, conversations with history, and the session faces share."""
