// A provider module for the bridge tests: the DirectoryProvider, except that backup_vm logs a
// line and then waits until its call is cancelled (a task stop) or the host is killed.
import { DirectoryProvider, CancelledError } from '../../../dist/index.js';

export default class SlowProvider extends DirectoryProvider {
  async backupVm(vmid, _config, _volumes, info) {
    this.context.log('info', `backup_vm of VM ${vmid} started`);
    await new Promise((resolve) => {
      if (info.signal.aborted) resolve();
      info.signal.addEventListener('abort', () => resolve(), { once: true });
    });
    this.context.log('info', 'backup_vm saw the cancellation');
    throw new CancelledError('backup cancelled', { cause: info.signal.reason });
  }
}
