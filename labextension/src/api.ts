/**
 * The server extension's routes (sage_magic/server/handlers.py). ServerConnection adds the token and the
 * XSRF header that Jupyter requires on POSTs, so the sidebar is authenticated like every JupyterLab call.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One row of GET /sage-magic/servers (ServerStatus.as_dict; the API key is never sent). */
export interface IModelServer {
  id: string;
  name: string;
  kind: string;
  adapters: string[];
  port: number;
  socket: string | null;
  pid: number | null;
  /** Processes (kernels, terminals) using the server; `leases` counts their leases, one per fine-tune asked. */
  owners: number;
  leases: number;
  state: string;
  uptime_s: number;
  memory_bytes: number;
  keep_alive: number;
}

/**
 * One row of GET /sage-magic/finetunes (CatalogEntry.as_dict): what `sage finetune list` shows. A broken
 * fine-tune has a `problem`; its other fields are null when the catalog could not read them.
 */
export interface IFinetune {
  name: string;
  base: string | null;
  newest_checkpoint: number | null;
  rank: number | null;
  merged: boolean;
  problem: string | null;
}

/** One row of GET /sage-magic/indexes (IndexInfo without its per-file sources). */
export interface IIndex {
  name: string;
  files: number;
  chunks: number;
  updated: string;
}

/** The engine's message (one paragraph: cause and next step) when a route refuses. */
export class SageRequestError extends Error {}

async function call<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'sage-magic', path);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  const data: unknown = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const message = (data as { message?: string }).message ?? response.statusText;
    throw new SageRequestError(message);
  }
  return data as T;
}

export async function listServers(): Promise<IModelServer[]> {
  return (await call<{ servers: IModelServer[] }>('servers')).servers;
}

export async function stopServer(id: string): Promise<string[]> {
  const path = `servers/${encodeURIComponent(id)}/stop`;
  return (await call<{ stopped: string[] }>(path, { method: 'POST' })).stopped;
}

export async function stopAll(): Promise<string[]> {
  return (await call<{ stopped: string[] }>('servers/stop-all', { method: 'POST' })).stopped;
}

export async function serverLog(id: string, lines = 200): Promise<string> {
  const path = `servers/${encodeURIComponent(id)}/log?lines=${lines}`;
  return (await call<{ log: string }>(path)).log;
}

export async function listFinetunes(): Promise<IFinetune[]> {
  return (await call<{ finetunes: IFinetune[] }>('finetunes')).finetunes;
}

export async function listIndexes(): Promise<IIndex[]> {
  return (await call<{ indexes: IIndex[] }>('indexes')).indexes;
}
