// A provider module for the bridge tests: the DirectoryProvider, except that backup_vm logs a
// line and then waits until its call is cancelled (a task stop) or the host is killed. It logs
// whether the host's reason is this package's CancelledError: the host (dist/cli/main.js) and this
// module (dist/index.js) must share one copy of the package's classes (scripts/bundle.mjs).
import { DirectoryProvider, CancelledError } from '../../../dist/index.js';

export default class SlowProvider extends DirectoryProvider {
  async backupVm(vmid, _config, _volumes, info) {
    this.context.log('info', `backup_vm of VM ${vmid} started`);
    await new Promise((resolve) => {
      if (info.signal.aborted) resolve();
      info.signal.addEventListener('abort', () => resolve(), { once: true });
    });
    this.context.log('info', `backup_vm saw the cancellation (the package's CancelledError: ${info.signal.reason instanceof CancelledError})`);
    throw new CancelledError('backup cancelled', { cause: info.signal.reason });
  }
}
