"""Child process of the embedding metric: cosine similarity of text pairs with the RAG embedder.

Reads ``{"embedder": SPEC_OR_NULL, "pairs": [[a, b], ...]}`` on stdin, writes a JSON list of cosines on stdout.
A one-shot child (rather than the RAG search helper) because an evaluation embeds once, at its end, and the
search service's contract has no "embed" call; see ``sage_magic.evals.metrics.embedding_scores``.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    job = json.load(sys.stdin)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library chatter must not corrupt the answer
    from ..core.errors import SageError
    from ..rag.embedder import load_embedder
    from ..rag.model_ref import resolve_embedder

    try:
        embedder = load_embedder(resolve_embedder(job["embedder"]))
    except SageError as error:
        print(error, file=sys.stderr)
        return 2
    pairs = job["pairs"]
    left = embedder.encode([a for a, _ in pairs])
    right = embedder.encode([b for _, b in pairs])
    out.write(json.dumps([float(x) for x in (left * right).sum(axis=1)]))  # unit vectors: dot = cosine
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
