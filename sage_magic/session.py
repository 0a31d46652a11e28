"""``sage_magic.session.Session``, the import path the README has always documented for the kernel session.

The session lives in :mod:`sage_magic.chat.session` with the rest of the chat engine; this name stays so that
notebooks written against it keep working. It imports only the light session module.
"""

from .chat.reply import Reply
from .chat.session import Session

__all__ = ["Reply", "Session"]
