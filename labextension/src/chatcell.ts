/**
 * Open a chat in the current notebook: a code cell that runs `%sage_chat` (with a fine-tune, or plain: the
 * panel then offers a fine-tune picker), below the active cell, run at once. The palette command and a
 * click on a fine-tune in the sidebar both come here.
 */
import { showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';

const LOAD = '%load_ext sage_magic';

/** Whether a cell of the notebook loads the extension (then the chat cell need not). */
function loadsExtension(sources: string[]): boolean {
  return sources.some(source => source.split('\n').some(line => line.trim() === LOAD));
}

/** Insert and run the chat cell in the current notebook; say so if there is no notebook to put it in. */
export async function openChatCell(notebooks: INotebookTracker | null, args = ''): Promise<void> {
  const current = notebooks?.currentWidget;
  if (!current) {
    await showErrorMessage(
      'No notebook to open the chat in',
      'The chat opens as a cell of the current notebook: open or create a notebook, then try again.'
    );
    return;
  }
  const notebook = current.content;
  const magic = args ? `%sage_chat ${args}` : '%sage_chat';
  let source = `${LOAD}\n${magic}`;
  if (loadsExtension((notebook.model?.sharedModel.cells ?? []).map(cell => cell.getSource()))) {
    // the notebook loads the extension in a cell of its own, which this kernel may not have run (a restart):
    // load it silently rather than print "already loaded" above the chat
    const kernel = current.sessionContext.session?.kernel;
    await kernel?.requestExecute({ code: LOAD, silent: true, store_history: false }).done;
    source = magic;
  }
  const active = notebook.activeCell;
  // an empty code cell (a new notebook's first one) is used as is; otherwise a new cell goes below
  if (!active || active.model.type !== 'code' || active.model.sharedModel.getSource().trim()) {
    NotebookActions.insertBelow(notebook);
  }
  notebook.activeCell?.model.sharedModel.setSource(source);
  await NotebookActions.run(notebook, current.sessionContext);
}

/** Names a cell can carry as they are: IPython expands `$x` and `{x}` in a magic's line, and a newline would
 * start a line of Python, so a fine-tune folder named otherwise is refused rather than quoted. */
const PLAIN_NAME = /^[A-Za-z0-9_.+-]+$/;

/** Open a chat with fine-tune NAME in the current notebook. */
export async function openFinetuneChat(notebooks: INotebookTracker | null, name: string): Promise<void> {
  if (!PLAIN_NAME.test(name)) {
    await showErrorMessage(
      'This fine-tune cannot be opened from the sidebar',
      `Its folder name ${JSON.stringify(name)} has characters a notebook cell would interpret. Rename the ` +
        'folder under $SAGE_HOME/finetune_output to letters, digits and . _ + - only, then click it again.'
    );
    return;
  }
  await openChatCell(notebooks, `--finetune-model ${name}`);
}
