/**
 * The "SAGE" left-sidebar panel: running model servers (each with Stop and a log view, and Stop all), then
 * the fine-tunes (a click opens a chat with one in the current notebook) and the indexes.
 *
 * Rows are updated in place, keyed by server id (fine-tune and index name), never rebuilt: a poll must not
 * reset the log a user is scrolling through, the text they selected or the button they are about to click.
 */
import { showErrorMessage } from '@jupyterlab/apputils';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { IFinetune, IIndex, IModelServer, stopServer } from './api';
import { SageModel } from './model';

export const PANEL_ID = 'sage-magic-sidebar';

/** What the panel's clicks do beyond the model (they need the application's notebooks). */
export interface ISidebarActions {
  openChat(finetune: string): void;
  stopAll(): void;
}

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

/** Set a node's text only when it changed (an unchanged text keeps the user's selection in it). */
function setText(node: HTMLElement, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
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

/** How many adapter names a server row shows before "and N more" (faces/text.py folds `sage ps` alike). */
const FOLD_SHOWN = 3;

/** "a, b, c and 97 more": a base server may carry a hundred fine-tunes. */
function fold(names: string[]): string {
  if (names.length <= FOLD_SHOWN + 1) {
    return names.join(', ');
  }
  return `${names.slice(0, FOLD_SHOWN).join(', ')} and ${names.length - FOLD_SHOWN} more`;
}

/** A row of a keyed list. */
interface IRow<T> {
  node: HTMLElement;
  update(item: T): void;
}

/** A <ul> whose rows are kept by key: new items get a row, gone ones lose theirs, the others are updated. */
class KeyedList<T> {
  readonly node: HTMLUListElement;

  constructor(
    className: string,
    empty: string | null,
    private _key: (item: T) => string,
    private _make: (item: T) => IRow<T>
  ) {
    this.node = el('ul', className);
    this._empty = empty === null ? null : el('li', 'sage-magic-empty', empty);
  }

  update(items: T[]): void {
    const keys = new Set(items.map(this._key));
    for (const [key, row] of this._rows) {
      if (!keys.has(key)) {
        row.node.remove();
        this._rows.delete(key);
      }
    }
    items.forEach((item, i) => {
      const key = this._key(item);
      let row = this._rows.get(key);
      if (row === undefined) {
        row = this._make(item);
        this._rows.set(key, row);
      }
      row.update(item);
      // moved only when out of place: a moved node loses its scroll position
      if (this.node.children[i] !== row.node) {
        this.node.insertBefore(row.node, this.node.children[i] ?? null);
      }
    });
    if (this._empty && items.length === 0) {
      this.node.appendChild(this._empty);
    } else {
      this._empty?.remove();
    }
  }

  private _empty: HTMLLIElement | null;
  private _rows = new Map<string, IRow<T>>();
}

/** A running server: what it serves, its state, Stop, and its log (open or closed). */
class ServerRow implements IRow<IModelServer> {
  readonly node = el('li', 'sage-magic-server');

  constructor(
    server: IModelServer,
    private _model: SageModel
  ) {
    this._server = server;
    this.node.dataset.serverId = server.id;
    const buttons = el('div', 'sage-magic-buttons');
    this._stop.onclick = () => void this._stopServer();
    this._logButton.onclick = () => this._model.setLogOpen(this._server.id, !this._model.isLogOpen(this._server.id));
    buttons.append(this._stop, this._logButton);
    this._adapters.append(this._adaptersSummary, this._adaptersList);
    this.node.append(this._name, this._detail, buttons);
  }

  /**
   * A few adapters are named in the detail line; more fold into a collapsed list whose summary counts them
   * and names the first few. The element is kept across polls, so a list the user opened stays open.
   */
  private _showAdapters(adapters: string[]): string {
    if (adapters.length <= FOLD_SHOWN + 1) {
      this._adapters.remove();
      return adapters.length ? ` · adapters: ${adapters.join(', ')}` : '';
    }
    setText(this._adaptersSummary, `${adapters.length} adapters: ${fold(adapters)}`);
    setText(this._adaptersList, adapters.join(', '));
    if (this._adapters.parentNode !== this.node) {
      this.node.insertBefore(this._adapters, this._detail.nextSibling);
    }
    return '';
  }

  update(server: IModelServer): void {
    this._server = server;
    const where = server.socket ? 'socket' : `port ${server.port}`;
    const adapters = this._showAdapters(server.adapters);
    setText(this._name, `${server.name} (${server.kind})`);
    setText(
      this._detail,
      `${server.state} · ${where} · pid ${server.pid ?? '-'} · ${server.owners} owner(s) · ` +
        `up ${duration(server.uptime_s)} · ${megabytes(server.memory_bytes)}${adapters}`
    );
    const open = this._model.isLogOpen(server.id);
    setText(this._logButton, open ? 'Hide log' : 'Log');
    if (!open) {
      this._log?.remove();
      this._log = null;
      return;
    }
    if (this._log === null) {
      this._log = el('pre', 'sage-magic-log', 'Loading…');
      this.node.appendChild(this._log);
    }
    const text = this._model.logs.get(server.id);
    if (text !== undefined && text !== this._log.textContent) {
      // follow the tail while the user is at the end; otherwise stay where they scrolled to
      const log = this._log;
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 2;
      const top = log.scrollTop;
      log.textContent = text;
      log.scrollTop = atEnd ? log.scrollHeight : top;
    }
  }

  private async _stopServer(): Promise<void> {
    const server = this._server;
    this._stop.disabled = true;
    this._stop.textContent = 'Stopping…';
    try {
      await stopServer(server.id);
    } catch (reason) {
      await showErrorMessage(`Could not stop ${server.name}`, reason as Error);
      this._stop.disabled = false;
      this._stop.textContent = 'Stop';
    }
    this._model.refresh();
  }

  private _server: IModelServer;
  private _name = el('div', 'sage-magic-server-name');
  private _detail = el('div', 'sage-magic-server-detail');
  private _adapters = el('details', 'sage-magic-adapters');
  private _adaptersSummary = el('summary', 'sage-magic-adapters-summary');
  private _adaptersList = el('div', 'sage-magic-adapter-list');
  private _stop = el('button', 'jp-Button sage-magic-stop', 'Stop');
  private _logButton = el('button', 'jp-Button sage-magic-log-button', 'Log');
  private _log: HTMLPreElement | null = null;
}

/** A fine-tune as `sage finetune list` shows it; a usable one opens a chat on click, a broken one says why. */
class FinetuneRow implements IRow<IFinetune> {
  readonly node = el('li', 'sage-magic-finetune');

  constructor(
    finetune: IFinetune,
    private _actions: ISidebarActions
  ) {
    this._finetune = finetune;
    this.node.dataset.name = finetune.name;
    this.node.tabIndex = 0;
    this.node.setAttribute('role', 'button');
    this.node.onclick = () => this._open();
    this.node.onkeydown = event => {
      if (event.key === 'Enter') {
        this._open();
      }
    };
    this.node.append(this._name, this._detail);
  }

  update(ft: IFinetune): void {
    this._finetune = ft;
    setText(this._name, ft.name);
    const known = [
      ft.base !== null ? `base ${ft.base}` : null,
      ft.newest_checkpoint !== null ? `checkpoint ${ft.newest_checkpoint}` : null,
      ft.rank !== null ? `rank ${ft.rank}` : null,
      ft.merged ? 'merged' : null
    ].filter(part => part !== null);
    setText(this._detail, known.join(' · '));
    setText(this._problem, ft.problem ?? '');
    if (ft.problem) {
      this.node.appendChild(this._problem);
    } else {
      this._problem.remove();
    }
    this.node.classList.toggle('sage-magic-broken', ft.problem !== null);
    this.node.setAttribute('aria-disabled', String(ft.problem !== null));
    this.node.title = ft.problem
      ? `${ft.name} cannot be served: ${ft.problem}`
      : `Open a chat with ${ft.name} in the current notebook`;
  }

  private _open(): void {
    if (this._finetune.problem === null) {
      this._actions.openChat(this._finetune.name);
    }
  }

  private _finetune: IFinetune;
  private _name = el('div', 'sage-magic-finetune-name');
  private _detail = el('div', 'sage-magic-finetune-detail');
  private _problem = el('div', 'sage-magic-problem');
}

class IndexRow implements IRow<IIndex> {
  readonly node = el('li', 'sage-magic-index');

  update(index: IIndex): void {
    setText(this.node, `${index.name}: ${index.files} files, ${index.chunks} chunks`);
  }
}

export class SagePanel extends Widget {
  constructor(model: SageModel, actions: ISidebarActions) {
    super();
    this.id = PANEL_ID;
    this.addClass('sage-magic-panel');
    this._model = model;
    this._servers = new KeyedList<IModelServer>(
      'sage-magic-servers',
      'No model server is running.',
      server => server.id,
      server => new ServerRow(server, model)
    );
    this._finetunes = new KeyedList<IFinetune>(
      'sage-magic-finetunes',
      null,
      ft => ft.name,
      ft => new FinetuneRow(ft, actions)
    );
    this._indexes = new KeyedList<IIndex>(
      'sage-magic-indexes',
      null,
      index => index.name,
      () => new IndexRow()
    );
    const stopAll = el('button', 'jp-Button sage-magic-stop-all', 'Stop all');
    stopAll.title = 'Stop every model server of this registry (asks first)';
    stopAll.onclick = () => actions.stopAll();
    const serversHeading = el('div', 'sage-magic-heading-row');
    serversHeading.append(this._serversTitle, stopAll);
    this.node.append(
      el('h2', 'sage-magic-title', 'SAGE'),
      this._error,
      serversHeading,
      this._servers.node,
      this._finetunesTitle,
      this._finetunes.node,
      this._indexesTitle,
      this._indexes.node
    );
    model.changed.connect(this._update, this);
    this._update();
  }

  dispose(): void {
    this._model.changed.disconnect(this._update, this);
    super.dispose();
  }

  /** A sidebar restored open gets no after-show, only this. */
  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    this._model.setShown(this.isVisible);
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._model.setShown(true);
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._model.setShown(false);
  }

  private _update(): void {
    const model = this._model;
    setText(this._error, model.error ?? '');
    this._error.hidden = !model.error;
    setText(this._serversTitle, `Model servers (${model.servers.length})`);
    this._servers.update(model.servers);
    setText(this._finetunesTitle, `Fine-tunes (${model.finetunes.length})`);
    this._finetunes.update(model.finetunes);
    setText(this._indexesTitle, `Indexes (${model.indexes.length})`);
    this._indexes.update(model.indexes);
  }

  private _model: SageModel;
  private _servers: KeyedList<IModelServer>;
  private _finetunes: KeyedList<IFinetune>;
  private _indexes: KeyedList<IIndex>;
  private _error = el('div', 'sage-magic-error');
  private _serversTitle = el('h3', 'sage-magic-heading');
  private _finetunesTitle = el('h3', 'sage-magic-heading');
  private _indexesTitle = el('h3', 'sage-magic-heading');
}
