"""``%sage eval``: every prompt of a DataFrame to every model, concurrently, as a summary table and a bar chart.

Thin over :func:`sage_magic.evals.evaluate.evaluate`; the summary rows are the ones ``sage eval`` prints.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .display import publish
from .parsing import identifier, notebook_variable

if TYPE_CHECKING:
    from .context import CellContext
    from .parsing import MagicParser


def eval_parser() -> "MagicParser":
    """``sage eval``'s options (options.add_eval_options), the table a DataFrame variable, plus -o and --diff."""
    from ..faces.options import add_eval_options
    from .parsing import MagicParser

    parser = MagicParser(prog="%sage eval")
    parser.add_argument("data", type=identifier, metavar="VAR", help="a DataFrame with a prompt column")
    add_eval_options(parser)
    parser.add_argument("-o", "--output", type=identifier, metavar="VAR",
                        help="store the results DataFrame (one row per prompt) in VAR")
    parser.add_argument("--diff", action="store_true", help="also list the rows where the models disagree")
    return parser


def eval_cell(magics: "CellContext", args: argparse.Namespace) -> Any:
    """Evaluate the DataFrame's prompts with every model; show the summary table and a bar chart.

    Whatever ends the run, what finished is shown and stored in ``-o`` first, then saved: an unwritable
    ``--save`` is refused before anything is asked, a save that fails anyway is raised after the table, and an
    interrupt is raised again after the partial table, so that "Run all" stops here as it does for training.
    ``--report-to mlflow`` logs like ``--save`` saves, from a child process (mlflow never enters the kernel)."""
    import sys

    from ..chat.backends import attach_options, remote_endpoint
    from ..core.errors import SageError
    from ..core.tables import from_dataframe
    from ..evals.evaluate import EvalInterrupted, check_save_path, evaluate, items_from_table
    from ..faces.options import model_names
    from ..faces.text import saved_note
    from ..tracking.report import check_installed, log_eval, trackers
    from .display import LiveOutput

    frame = notebook_variable(magics.shell.user_ns, args.data, "Pass the name of a pandas DataFrame of prompts.")
    items = items_from_table(from_dataframe(frame, f"DataFrame {args.data!r}"), args.prompt_col, args.expected_col)
    if args.save:
        check_save_path(args.save)
    session = magics.session
    check_installed(session.settings.python, args.report_to)
    live = LiveOutput(magics.shell, max(magics.update_interval, 0.25))
    interrupted = False
    try:
        result = evaluate(items, model_names(args.models), manager=session.manager, remote=remote_endpoint(args),
                          attach=attach_options(args, session.settings),
                          metrics=args.metrics, concurrency=args.concurrency, seed=args.seed,
                          max_tokens=args.max_tokens, temperature=args.temperature, system=args.system,
                          embedder=session.settings.embedder, progress=live.progress)
    except EvalInterrupted as stop:
        result, interrupted = stop.result, True
    if args.output:
        magics.shell.user_ns[args.output] = result.to_dataframe()
    live.show(eval_bundle(result))
    if args.diff:
        publish(magics.shell, diff_bundle(result))
    keep = [lambda: saved_note(result.save(args.save))] if args.save else []
    if "mlflow" in trackers(args.report_to):
        keep.append(lambda: log_eval(session.settings, result))
    failures = []
    for step in keep:  # each is tried even if one before it failed: what one keeps, the other may not
        try:
            print(step())
        except SageError as error:
            failures.append(error)
    for error in failures if interrupted else failures[1:]:  # the interrupt is what must stop "Run all"
        print(error, file=sys.stderr)
    if failures and not interrupted:
        raise failures[0]
    if interrupted:
        raise KeyboardInterrupt  # as %sage finetune watch does: the cells after this one must not run
    return None


def eval_bundle(result: Any) -> dict[str, Any]:
    """The summary table (the rows and notes ``sage eval`` prints) with a bar chart of the means."""
    import html

    from ..faces.text import SUMMARY_HEADERS, summary_notes, summary_rows, summary_title
    from . import render
    from .charts import bar_chart

    title = summary_title(result)
    table = render.table(summary_rows(result), SUMMARY_HEADERS, "Nothing was evaluated.")
    notes = summary_notes(result)
    summaries = [s for s in result.summary() if s.metric != "-"]
    chart = ""
    if summaries:
        several = len(result.metrics) > 1
        chart = bar_chart([(f"{s.model}\n{s.metric}" if several else s.model, s.mean, s.low, s.high)
                           for s in summaries],
                          title=f"mean {', '.join(result.metrics)} with 95% interval")
    return {"text/plain": "\n".join([title, table["text/plain"], *notes]),
            "text/html": f"<p>{html.escape(title)}</p>{table['text/html']}"
                         + "".join(f"<p>{html.escape(note)}</p>" for note in notes) + chart}


def diff_bundle(result: Any) -> dict[str, Any]:
    from . import render

    rows = [(row.index + 1, row.prompt, row.expected or "", *(
        (row.answers[m].text if row.answers[m].text is not None else f"error: {row.answers[m].error}")
        if m in row.answers else "-" for m in result.models)) for row in result.disagreements()]
    return render.table(rows, ("ROW", "PROMPT", "EXPECTED", *result.models), "Every model gave the same answers.")
