/**
 * The "SAGE" left-sidebar panel: running model servers (each with Stop and a log view), then the
 * fine-tunes and the indexes. Plain DOM: the lists are small and re-rendered whole on each poll.
 */
import { showErrorMessage } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { IModelServer, serverLog, stopServer } from './api';
import { SageModel } from './model';

export const PANEL_ID = 'sage-magic-sidebar';

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function duration(seconds: number): string {
  if (seconds < 60) {
    return `${Math.round(seconds)} s`;
  }
  if (seconds < 3600) {
    return `${Math.round(seconds / 60)} min`;
  }
  return `${(seconds / 3600).toFixed(1)} h`;
}

function megabytes(bytes: number): string {
  return bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : `${Math.round(bytes / 1e6)} MB`;
}

export class SagePanel extends Widget {
  constructor(model: SageModel) {
    super();
    this.id = PANEL_ID;
    this.addClass('sage-magic-panel');
    this._model = model;
    model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const model = this._model;
    const root = this.node;
    root.replaceChildren();
    root.appendChild(el('h2', 'sage-magic-title', 'SAGE'));
    if (model.error) {
      root.appendChild(el('div', 'sage-magic-error', model.error));
    }

    root.appendChild(el('h3', 'sage-magic-heading', `Model servers (${model.servers.length})`));
    const servers = el('ul', 'sage-magic-servers');
    if (model.servers.length === 0) {
      servers.appendChild(el('li', 'sage-magic-empty', 'No model server is running.'));
    }
    for (const server of model.servers) {
      servers.appendChild(this._serverRow(server));
    }
    root.appendChild(servers);

    root.appendChild(el('h3', 'sage-magic-heading', `Fine-tunes (${model.finetunes.length})`));
    const finetunes = el('ul', 'sage-magic-finetunes');
    for (const ft of model.finetunes) {
      const item = el('li', 'sage-magic-finetune', ft.name);
      item.title = ft.problem ?? `base ${ft.base ?? '?'}${ft.merged ? ', merged' : ''}`;
      if (ft.problem) {
        item.classList.add('sage-magic-broken');
      }
      finetunes.appendChild(item);
    }
    root.appendChild(finetunes);

    root.appendChild(el('h3', 'sage-magic-heading', `Indexes (${model.indexes.length})`));
    const indexes = el('ul', 'sage-magic-indexes');
    for (const index of model.indexes) {
      indexes.appendChild(
        el('li', 'sage-magic-index', `${index.name}: ${index.files} files, ${index.chunks} chunks`)
      );
    }
    root.appendChild(indexes);
  }

  private _serverRow(server: IModelServer): HTMLElement {
    const row = el('li', 'sage-magic-server');
    row.dataset.serverId = server.id;
    const where = server.socket ? 'socket' : `port ${server.port}`;
    row.appendChild(el('div', 'sage-magic-server-name', `${server.name} (${server.kind})`));
    const adapters = server.adapters.length ? ` · adapters: ${server.adapters.join(', ')}` : '';
    row.appendChild(
      el(
        'div',
        'sage-magic-server-detail',
        `${server.state} · ${where} · pid ${server.pid ?? '-'} · ${server.owners} owner(s) · ` +
          `up ${duration(server.uptime_s)} · ${megabytes(server.memory_bytes)}${adapters}`
      )
    );
    const buttons = el('div', 'sage-magic-buttons');
    const stop = el('button', 'jp-Button sage-magic-stop', 'Stop');
    stop.onclick = () => void this._stop(server, stop);
    const logButton = el('button', 'jp-Button sage-magic-log-button', this._openLogs.has(server.id) ? 'Hide log' : 'Log');
    logButton.onclick = () => {
      if (!this._openLogs.delete(server.id)) {
        this._openLogs.add(server.id);
      }
      this._render();
    };
    buttons.append(stop, logButton);
    row.appendChild(buttons);
    if (this._openLogs.has(server.id)) {
      const pre = el('pre', 'sage-magic-log', this._logs.get(server.id) ?? 'Loading…');
      row.appendChild(pre);
      void serverLog(server.id, 40).then(
        text => {
          this._logs.set(server.id, text);
          pre.textContent = text;
          pre.scrollTop = pre.scrollHeight;
        },
        (reason: Error) => (pre.textContent = reason.message)
      );
    }
    return row;
  }

  private async _stop(server: IModelServer, button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    button.textContent = 'Stopping…';
    try {
      await stopServer(server.id);
    } catch (reason) {
      await showErrorMessage(`Could not stop ${server.name}`, reason as Error);
    }
    this._openLogs.delete(server.id);
    await this._model.refresh();
  }

  private _model: SageModel;
  private _openLogs = new Set<string>();
  private _logs = new Map<string, string>();
}
