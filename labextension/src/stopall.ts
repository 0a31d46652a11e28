/**
 * "Stop all": every model server of the registry, including those other kernels and notebooks are chatting
 * with, so it asks first. The palette command and the sidebar's button both come here.
 */
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';

import { stopAll } from './api';
import { SageModel } from './model';

export async function confirmStopAll(model: SageModel): Promise<void> {
  const n = model.servers.length;
  const result = await showDialog({
    title: 'Stop all model servers?',
    body:
      `This stops ${n === 1 ? 'the 1 running model server' : `all ${n} running model servers`} of this ` +
      'registry, also those that other kernels and notebooks are using: their chats fail until a cell ' +
      'starts a server again.',
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Stop all' })],
    defaultButton: 0
  });
  if (!result.button.accept) {
    return;
  }
  try {
    await stopAll();
  } catch (reason) {
    await showErrorMessage('Could not stop the model servers', reason as Error);
  }
  model.refresh();
}
