/**
 * What the sidebar and the status item show, polled from the server extension. One model feeds both so
 * that the count in the status bar and the list in the sidebar never disagree.
 *
 * Two Lumino polls, both in standby while the browser tab is hidden:
 * - servers (and the logs open in the sidebar), every 3 s: the status item shows the count even when the
 *   sidebar is collapsed, so only the logs wait for the sidebar to be shown;
 * - the fine-tune and index catalog, every 15 s and only while the sidebar is shown (nothing else shows it).
 * A poll never starts a tick before its previous one has finished, and every fetch goes through one queue,
 * so a refresh asked for by a click (after Stop) never overlaps a tick either.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import {
  IFinetune,
  IIndex,
  IModelServer,
  listFinetunes,
  listIndexes,
  listServers,
  serverLog
} from './api';

const SERVER_POLL_MS = 3000;
const CATALOG_POLL_MS = 15000;
const MAX_BACKOFF_MS = 30000;
const LOG_LINES = 40;

function message(reason: unknown): string {
  return reason instanceof Error ? reason.message : String(reason);
}

export class SageModel {
  servers: IModelServer[] = [];
  finetunes: IFinetune[] = [];
  indexes: IIndex[] = [];
  /** The tail of each open log, by server id (absent: not loaded yet). */
  logs = new Map<string, string>();
  error: string | null = null;

  get changed(): ISignal<SageModel, void> {
    return this._changed;
  }

  /** Each tick of the server poll, standby ticks included (the status item shows the phase). */
  get ticked(): ISignal<SageModel, string> {
    return this._ticked;
  }

  /** Start both polls; the first ticks happen at once. */
  start(): void {
    if (this._servers !== null) {
      return;
    }
    this._servers = new Poll({
      factory: () => this._queue(() => this._fetchServers()),
      frequency: { interval: SERVER_POLL_MS, backoff: true, max: MAX_BACKOFF_MS },
      linger: 0,
      name: 'sage-magic:servers',
      standby: 'when-hidden'
    });
    this._servers.ticked.connect((_, state) => this._ticked.emit(state.phase));
    this._catalog = new Poll({
      factory: () => this._queue(() => this._fetchCatalog()),
      frequency: { interval: CATALOG_POLL_MS, backoff: true, max: MAX_BACKOFF_MS },
      name: 'sage-magic:catalog',
      standby: () => document.visibilityState === 'hidden' || !this._shown
    });
  }

  dispose(): void {
    this._servers?.dispose();
    this._catalog?.dispose();
    this._servers = this._catalog = null;
  }

  /** The sidebar was shown or hidden: when shown, its logs and the catalog are fetched at once. */
  setShown(shown: boolean): void {
    const wasShown = this._shown;
    this._shown = shown;
    if (shown && !wasShown) {
      void this._catalog?.refresh();
      this.refresh();
    }
  }

  /** Fetch the servers (and the open logs) now, e.g. after a Stop; `changed` says when they are in. */
  refresh(): void {
    void this._servers?.refresh();
  }

  isLogOpen(id: string): boolean {
    return this._openLogs.has(id);
  }

  /** Open or close a server's log; an opened one is fetched at once, then on every tick. */
  setLogOpen(id: string, open: boolean): void {
    if (open) {
      this._openLogs.add(id);
      this.refresh();
    } else {
      this._openLogs.delete(id);
      this.logs.delete(id);
      this._changed.emit();
    }
  }

  /** Run fetches one at a time, in the order asked (a failed one does not stop the next). */
  private _queue(fetch: () => Promise<void>): Promise<void> {
    const next = this._last.catch(() => undefined).then(fetch);
    this._last = next;
    return next;
  }

  private async _fetchServers(): Promise<void> {
    try {
      this.servers = await listServers();
      const running = new Set(this.servers.map(s => s.id));
      for (const id of [...this._openLogs]) {
        if (!running.has(id)) {
          this._openLogs.delete(id);
          this.logs.delete(id);
        }
      }
      if (this._shown) {
        for (const id of this._openLogs) {
          this.logs.set(id, await serverLog(id, LOG_LINES).catch(message));
        }
      }
      this.error = null;
    } catch (reason) {
      this.error = message(reason);
      throw reason; // the poll backs off
    } finally {
      this._changed.emit();
    }
  }

  private async _fetchCatalog(): Promise<void> {
    try {
      [this.finetunes, this.indexes] = await Promise.all([listFinetunes(), listIndexes()]);
    } catch (reason) {
      this.error = message(reason);
      throw reason;
    } finally {
      this._changed.emit();
    }
  }

  private _servers: Poll | null = null;
  private _catalog: Poll | null = null;
  private _shown = false;
  private _openLogs = new Set<string>();
  private _last: Promise<void> = Promise.resolve();
  private _changed = new Signal<SageModel, void>(this);
  private _ticked = new Signal<SageModel, string>(this);
}
