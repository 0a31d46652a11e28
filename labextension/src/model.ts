/**
 * What the sidebar and the status item show, polled from the server extension. One model feeds both so
 * that the count in the status bar and the list in the sidebar never disagree.
 */
import { ISignal, Signal } from '@lumino/signaling';

import {
  IFinetune,
  IIndex,
  IModelServer,
  listFinetunes,
  listIndexes,
  listServers
} from './api';

/** Servers change within seconds (starting, stopping); the catalog rarely: poll it less often. */
const SERVER_POLL_MS = 3000;
const CATALOG_EVERY = 5;

export class SageModel {
  servers: IModelServer[] = [];
  finetunes: IFinetune[] = [];
  indexes: IIndex[] = [];
  error: string | null = null;

  get changed(): ISignal<SageModel, void> {
    return this._changed;
  }

  /** Start polling; the first refresh happens at once. */
  start(): void {
    if (this._timer === null) {
      void this.refresh(true);
      this._timer = window.setInterval(() => void this.refresh(), SERVER_POLL_MS);
    }
  }

  dispose(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  /** Refresh the servers (and, now and then or when asked, the fine-tunes and indexes). */
  async refresh(catalog = false): Promise<void> {
    try {
      this.servers = await listServers();
      if (catalog || this._ticks % CATALOG_EVERY === 0) {
        [this.finetunes, this.indexes] = await Promise.all([listFinetunes(), listIndexes()]);
      }
      this.error = null;
    } catch (reason) {
      this.error = reason instanceof Error ? reason.message : String(reason);
    }
    this._ticks += 1;
    this._changed.emit();
  }

  private _ticks = 0;
  private _timer: number | null = null;
  private _changed = new Signal<SageModel, void>(this);
}
