/**
 * sage_magic's JupyterLab extension: the SAGE sidebar, the status-bar count of running model servers, and
 * two palette commands. Everything it shows or does goes through the server extension's /sage-magic/
 * routes, so it works with no kernel running.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { openChatCell, openFinetuneChat } from './chatcell';
import { SageModel } from './model';
import { PANEL_ID, SagePanel } from './panel';
import { confirmStopAll } from './stopall';

const sageIcon = new LabIcon({
  name: 'sage-magic:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<path d="M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20zm0 2a8 8 0 0 1 6.9 12H5.1A8 8 0 0 1 12 4zm-1 3v6h2V7z"/>' +
    '</g></svg>'
});

namespace CommandIDs {
  export const openChat = 'sage-magic:open-chat';
  export const stopAll = 'sage-magic:stop-all';
  export const showPanel = 'sage-magic:show-panel';
}

/**
 * The status-bar item: "SAGE: N servers"; a click opens the sidebar. Its data-poll attribute is the server
 * poll's last phase ("standby" while the tab is hidden), rewritten on every tick.
 */
class ServerCount extends Widget {
  constructor(model: SageModel, open: () => void) {
    super();
    this.addClass('sage-magic-status');
    this.node.title = 'Running model servers (click to open the SAGE sidebar)';
    this.node.onclick = open;
    const render = () => {
      const n = model.servers.length;
      this.node.textContent = `SAGE: ${n} server${n === 1 ? '' : 's'}`;
      this.node.dataset.count = String(n);
    };
    model.changed.connect(render);
    model.ticked.connect((_, phase) => this.node.setAttribute('data-poll', phase));
    render();
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'sage-magic:plugin',
  description: 'SAGE sidebar, status item and commands for sage_magic model servers.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, INotebookTracker, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    palette: ICommandPalette | null,
    notebooks: INotebookTracker | null,
    statusBar: IStatusBar | null
  ) => {
    const model = new SageModel();
    const panel = new SagePanel(model, {
      openChat: name => void openFinetuneChat(notebooks, name),
      stopAll: () => void confirmStopAll(model)
    });
    panel.title.icon = sageIcon;
    panel.title.caption = 'SAGE: model servers, fine-tunes, indexes';
    shell.add(panel, 'left', { rank: 900 });
    model.start();

    app.commands.addCommand(CommandIDs.showPanel, {
      label: 'SAGE: Show model servers',
      execute: () => shell.activateById(PANEL_ID)
    });

    app.commands.addCommand(CommandIDs.openChat, {
      label: 'SAGE: Open chat in this notebook',
      isEnabled: () => notebooks?.currentWidget != null,
      execute: () => openChatCell(notebooks)
    });

    app.commands.addCommand(CommandIDs.stopAll, {
      label: 'SAGE: Stop all model servers',
      execute: () => confirmStopAll(model)
    });

    for (const command of [CommandIDs.openChat, CommandIDs.stopAll, CommandIDs.showPanel]) {
      palette?.addItem({ command, category: 'SAGE' });
    }

    statusBar?.registerStatusItem('sage-magic:server-count', {
      item: new ServerCount(model, () => shell.activateById(PANEL_ID)),
      align: 'left',
      rank: 50
    });
  }
};

export default plugin;
